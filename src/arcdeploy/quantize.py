"""int8 quantization: one recipe object that every int8 path consumes.

:class:`QuantRecipe` says what is quantized and how (weights per channel and
symmetric, activations asymmetric for PReLU networks, range estimation, bias
correction, the overflow fix for CPUs without VNNI), which parts stay in float and
why, and what those float parts execute in. It names no quantizer's objects: the
engines turn it into their quantizer's arguments (:mod:`arcdeploy.engines.nncf_quant` for
NNCF, :func:`arcdeploy.engines.onnxruntime.ort_quantization_kwargs` for ONNX Runtime's
``quantize_static``); the manifest's ``calibration`` entry is
:meth:`QuantRecipe.manifest_entry`, never written by hand.

Float roles are resolved on each graph: ``stem`` (the first convolution, which sees
the 3-channel image), ``head`` (the fc MatMul/Gemm and everything after it: the
BN1d), ``spread`` (layers whose input channels have ranges so different that one
per-tensor uint8 range would flatten most of them: measured on the calibration
images), ``depthwise`` (grouped convolutions with one filter per channel; not a
default), plus layers named one by one (``layers``: what the accuracy-aware
fallback adds).

Why these defaults (measured on a trained MobileFaceNet and real LFW faces): nearly
all of the int8 loss sat in one layer, the first depthwise convolution, whose input
(the stem's PReLU output) has per-channel ranges 34x apart (median channel 0.15 of a
5.1 range; the next worst layer 4.6x); keeping it float took the per-image cosine
from 0.985 to 0.995 and LFW back to the fp32 figure. MinMax ranges beat the
averaging estimators (mean/median of per-sample ranges clip: cosine 0.90-0.92);
per-channel weights beat per-tensor (+0.012); asymmetric activations beat symmetric
(+0.002); 7-bit weights cost 0.005 where the CPU has VNNI, so they are used only
where it has not (there u8 x s8 products saturate in int16).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .errors import ArcdeployError
from .manifest import CalibrationRecord
from .types import FloatLayerPrecision

ROLES = ("stem", "head", "spread", "depthwise")
ROLE_WHY = {
    "spread": "the per-channel ranges of the layer's input differ so much (max / median above the recipe's "
    "spread_threshold) that one per-tensor uint8 range would flatten most channels",
    "stem": "the first convolution sees the 3-channel image: int8 costs the most fidelity there for ~1% of the MACs",
    "head": "the fc + BN1d head writes the embedding itself; it is a few % of the work",
    "depthwise": "depthwise convolutions have one filter per channel and lose the most in int8",
    "layers": "kept in float by the accuracy-aware fallback (most sensitive first)",
}
RANGE_ESTIMATORS = ("minmax", "mean_minmax", "mean_quantile", "histogram", "median_minmax", "mean_no_outliers_minmax")
BIAS_CORRECTION = ("fast", "full", "none")
OVERFLOW_FIX = ("enable", "first_layer", "disable")
DEFAULT_CALIBRATION_COUNT = 300


@dataclass(frozen=True)
class QuantRecipe:
    """How an int8 package is made (see the module doc)."""

    per_channel_weights: bool = True
    symmetric_activations: bool = False  # asymmetric: PReLU outputs are not centred on 0
    weight_bits: int = 8  # 7: the overflow fix in every layer
    overflow_fix: str = "disable"  # NNCF's OverflowFix for 8-bit weights (7-bit weights: always "enable")
    range_estimator: str = "minmax"  # activations
    bias_correction: str = "fast"
    calibration_count: int = DEFAULT_CALIBRATION_COUNT
    keep_float: tuple[str, ...] = ("stem", "spread", "head")
    spread_threshold: float = 10.0  # "spread": max / median of the per-channel input ranges
    float_layers: tuple[str, ...] = ()  # named layers kept in float (the fallback's choice)
    float_precision: FloatLayerPrecision = FloatLayerPrecision.F32  # what float layers execute in (OpenVINO CPU)
    ort_op_types: tuple[str, ...] = ("Conv",)  # ops quantize_static quantizes

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("range_estimator", self.range_estimator, RANGE_ESTIMATORS),
            ("bias_correction", self.bias_correction, BIAS_CORRECTION),
            ("overflow_fix", self.overflow_fix, OVERFLOW_FIX),
            ("float_precision", self.float_precision, tuple(FloatLayerPrecision)),
        ):
            if value not in allowed:
                raise ArcdeployError(f"int8 recipe: {name} {value!r}; choose one of {', '.join(allowed)}")
        object.__setattr__(self, "float_precision", FloatLayerPrecision(self.float_precision))  # given as text too
        if self.weight_bits not in (7, 8):
            raise ArcdeployError(f"int8 recipe: weight_bits must be 7 or 8, got {self.weight_bits}")
        unknown = [r for r in self.keep_float if r not in ROLES]
        if unknown:
            raise ArcdeployError(
                f"int8 recipe: unknown float role(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}"
            )
        if self.calibration_count < 1:
            raise ArcdeployError(f"--calib-count must be at least 1, got {self.calibration_count}")

    # ---- construction
    @classmethod
    def for_this_cpu(cls, **overrides: Any) -> QuantRecipe:
        """The default recipe for the CPU it runs on: 7-bit weights where int8 products
        saturate (no VNNI / AMX), full 8 bits elsewhere."""
        from .machine import has_int8_dot_product

        base = cls() if has_int8_dot_product() else cls(weight_bits=7, overflow_fix="enable")
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    def with_float_layers(self, names: list[str] | tuple[str, ...]) -> QuantRecipe:
        return replace(self, float_layers=tuple(dict.fromkeys((*self.float_layers, *names))))

    @property
    def effective_overflow_fix(self) -> str:
        """The overflow fix the quantizer applies: always "enable" with 7-bit weights."""
        return "enable" if self.weight_bits == 7 else self.overflow_fix

    def describe(self) -> str:
        weights = f"{'per-channel' if self.per_channel_weights else 'per-tensor'} symmetric int8 weights" + (
            " (7-bit range: overflow fix for CPUs without VNNI)" if self.weight_bits == 7 else ""
        )
        acts = "symmetric" if self.symmetric_activations else "asymmetric uint8"
        bias = {"fast": "fast bias correction", "full": "bias correction", "none": "no bias correction"}[
            self.bias_correction
        ]
        return f"{weights}, {acts} activations ({self.range_estimator} ranges), {bias}"

    def manifest_entry(self, method: str, kept: FloatScope, count: int) -> CalibrationRecord:
        """The manifest's ``calibration`` entry: generated from the recipe and the resolved float scope."""
        return CalibrationRecord(
            method=f"{method}: {self.describe()}",
            recipe=self.to_json(),
            count=int(count),
            kept_float=kept.names(),
            kept_float_why={role: ROLE_WHY[role] for role in kept.roles()},
            input_channel_spread={k: round(v, 2) for k, v in kept.spreads.items()} if kept.spreads else None,
            seven_bit_weights=self.weight_bits == 7,
            float_layers_execute=self.float_precision,
        )

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass
class FloatScope:
    """The layers of one graph that stay in float, each with the role that put it there."""

    entries: list[tuple[str, str]] = field(default_factory=list)  # (layer name, role)
    spreads: dict[str, float] = field(default_factory=dict)  # measured input channel spread of "spread" layers

    def add(self, name: str, role: str) -> None:
        if name not in {n for n, _ in self.entries}:
            self.entries.append((name, role))

    def names(self) -> list[str]:
        return [n for n, _ in self.entries]

    def roles(self) -> list[str]:
        return list(dict.fromkeys(r for _, r in self.entries))


def channel_spread(x: np.ndarray, axis: int = 1) -> float:
    """How far apart the ranges of a tensor's channels are: the widest channel range over the
    median one (a batch of activations, channels on ``axis``). inf when most channels are constant."""
    x = np.moveaxis(np.asarray(x, dtype=np.float32), axis, 0).reshape(x.shape[axis], -1)
    return range_spread(x.max(axis=1) - x.min(axis=1))


def range_spread(ranges: np.ndarray) -> float:
    """The widest of the channel ranges over their median (inf when most channels are constant)."""
    ranges = np.asarray(ranges, dtype=np.float64)
    median = float(np.median(ranges))
    return float(ranges.max() / median) if median > 0 else float("inf")


def spread_layers(spreads: dict[str, float], recipe: QuantRecipe) -> list[str]:
    return [name for name, s in spreads.items() if s > recipe.spread_threshold]


def float_nodes_onnx(model, recipe: QuantRecipe, spreads: dict[str, float] | None = None) -> FloatScope:
    """The ONNX node names the recipe keeps in float (graph order); ``spreads``: each Conv's input
    channel spread (:func:`channel_spread`), needed for the ``spread`` role."""
    nodes = list(model.graph.node)
    scope = FloatScope()
    if "stem" in recipe.keep_float:
        first = next((n for n in nodes if n.op_type == "Conv"), None)
        if first is not None:
            scope.add(first.name, "stem")
    if "spread" in recipe.keep_float and spreads:
        for name in spread_layers(spreads, recipe):
            scope.add(name, "spread")
            scope.spreads[name] = spreads[name]
    if "depthwise" in recipe.keep_float:
        channels = _onnx_channels(model)
        for n in nodes:
            if n.op_type == "Conv":
                group = next((a.i for a in n.attribute if a.name == "group"), 1)
                if group > 1 and channels.get(n.input[1]) == group:
                    scope.add(n.name, "depthwise")
    if "head" in recipe.keep_float:
        idx = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=None)
        if idx is not None:
            for n in nodes[idx:]:
                scope.add(n.name, "head")
    for name in recipe.float_layers:
        scope.add(name, "layers")
    return scope


def _onnx_channels(model) -> dict[str, int]:
    """Output channels of each Conv weight initializer (dim 0)."""
    return {init.name: int(init.dims[0]) for init in model.graph.initializer if len(init.dims) == 4}


@contextlib.contextmanager
def quiet_quantizers() -> Iterator[None]:
    """Silence the quantizers' progress bars and INFO logs (their warnings still reach the log)."""
    loggers = [logging.getLogger(n) for n in ("nncf", "onnxruntime", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
