"""NNCF post-training quantization from a :class:`~arcdeploy.quantize.QuantRecipe`, for the engines
whose int8 models NNCF makes (OpenVINO, and ONNX Runtime through NNCF's ONNX backend).

The recipe stays the engine-neutral description; this module is the one place that turns it
into NNCF's own objects.
"""

from __future__ import annotations

from typing import Any

from ..quantize import QuantRecipe, quiet_quantizers


def nncf_arguments(recipe: QuantRecipe, subset_size: int, ignored_names: list[str]) -> dict:
    """Keyword arguments for ``nncf.quantize`` (either backend)."""
    import nncf
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
        QuantizationParameters,
    )

    overflow = {
        "enable": OverflowFix.ENABLE,
        "first_layer": OverflowFix.FIRST_LAYER,
        "disable": OverflowFix.DISABLE,
    }[recipe.effective_overflow_fix]
    advanced: dict[str, Any] = {"overflow_fix": overflow, "disable_bias_correction": recipe.bias_correction == "none"}
    # explicit: left unset, NNCF averages per-image ranges for per-tensor activations (MEAN_MINMAX)
    if recipe.range_estimator != "nncf_default":
        advanced["activations_range_estimator_params"] = activation_ranges(recipe)
    if not recipe.per_channel_weights:
        advanced["weights_quantization_params"] = QuantizationParameters(per_channel=False)
    preset = nncf.QuantizationPreset.PERFORMANCE if recipe.symmetric_activations else nncf.QuantizationPreset.MIXED
    return {
        "preset": preset,
        "subset_size": subset_size,
        "fast_bias_correction": recipe.bias_correction != "full",
        "advanced_parameters": AdvancedQuantizationParameters(**advanced),
        "ignored_scope": nncf.IgnoredScope(names=list(ignored_names), validate=False),
    }


def activation_ranges(recipe: QuantRecipe) -> Any:
    """NNCF's range estimator for the recipe's activations. ``max_quantile``: per image, the range
    without its most extreme ``quantile_outlier_prob`` of values; over images, the widest."""
    from nncf.quantization.range_estimator import (
        AggregatorType,
        RangeEstimatorParameters,
        RangeEstimatorParametersSet,
        StatisticsCollectorParameters,
        StatisticsType,
    )

    if recipe.range_estimator != "max_quantile":
        return getattr(RangeEstimatorParametersSet, recipe.range_estimator.upper())
    q = recipe.quantile_outlier_prob
    return RangeEstimatorParameters(
        min=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MIN, quantile_outlier_prob=q),
        max=StatisticsCollectorParameters(StatisticsType.QUANTILE, AggregatorType.MAX, quantile_outlier_prob=q),
    )


def nncf_quantize(model: Any, samples: list, recipe: QuantRecipe, ignored_names: list[str]) -> Any:
    """``model`` (an OpenVINO or ONNX model) quantized by NNCF on ``samples`` (one calibration input
    each), keeping ``ignored_names`` in float; its progress output silenced."""
    import nncf

    with quiet_quantizers():
        return nncf.quantize(model, nncf.Dataset(samples), **nncf_arguments(recipe, len(samples), list(ignored_names)))
