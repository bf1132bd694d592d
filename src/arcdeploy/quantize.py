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
images), ``depthwise`` (grouped convolutions whose filters see at most
:data:`DEPTHWISE_MAX_GROUP_INPUTS` input channels each), plus layers named one by one
(``layers``: what the accuracy-aware fallback adds).

Why these defaults (measured on the trained MobileFaceNet and insightface's w600k_mbf,
real faces). The gate used to see only faces like the calibration set; on
other faces the previous recipe (stem + spread + head in float, NNCF's default ranges)
fell to cosine 0.93 (colour photos), 0.945 (colour LFW), 0.945 (small faces) when
calibrated on grayscale LFW. Two causes, each measured:

- *Colour lives in the depthwise layers.* NNCF quantizes a depthwise convolution's input
  per channel, each channel with the range the calibration faces gave it (their true
  min / max). On grayscale faces the channels that carry colour are flat, so their ranges
  are near zero, and colour faces overflow them: on the first two depthwise inputs 1.2% of
  a colour face's values were clipped, against 0.001% of a grayscale face's. Quantized
  alone, each of these layers cost 0.002-0.003 of cosine on colour faces and nothing on
  grayscale ones, nor on the same colour faces turned grayscale. Keeping the depthwise
  convolutions in float removes this whatever the calibration set (colour LFW 0.989 ->
  0.995 mean); they are 3.5% of the MACs, and the int8 package keeps about 85% of its speed
  (measured on an AVX-512 VNNI CPU: 1.7-2.0x fp32 instead of 2.1-2.2x).
- *Ranges were averages.* For per-tensor activations NNCF's default is MEAN_MINMAX (the
  mean over calibration images of each image's min and max), so every face brighter or
  more contrasted than the average one is clipped, in the last blocks most (up to 2.4x
  the range on the colour photos). The per-tensor ranges are now the widest of the images' own
  ranges, each image's most extreme 1e-5 of values left out (``max_quantile``): with the
  depthwise layers in float the photos' min went from 0.945 to 0.992. The true min / max
  (``minmax``) did nearly as well on the mbf (0.991) but less on w600k's colour faces
  (0.978 vs 0.984): one extreme image widens every range; per-image 1e-4 quantiles clip
  too much (0.963).

Together, on the mbf calibrated on grayscale LFW (300, 50 or 16 faces), colour LFW (300)
or 800 mixed, and on w600k_mbf calibrated on 300 grayscale, 300 colour or 16 faces: every
check set (colour photos, held-out grayscale LFW, colour LFW by group, detector-fed faces
60-100 px wide) meets mean >= 0.99 and min >= 0.97, the lowest min 0.978. What the recipe
needs from a calibration set (:mod:`arcdeploy.calibration_set`): at least
:data:`MIN_CALIBRATION_FACES` faces (8 faces, of one person or of eight, fell to
0.945-0.959 on the photos); fewer than :data:`ADVISED_CALIBRATION_FACES`, all grayscale, or
one person are warned about. Tried and not kept: bias correction off (no change),
calibration augmentation (colour tint / jitter, light, downscaling: +0.005 on the min for
16 or 8 faces, not enough to make 8 faces safe, so the recipe asks for more faces instead).
The one case measured worse: untrained (random-weight) IResNets, whose extreme activations
carry nothing, prefer averaged ranges (r18 on generated faces: 0.991 instead of 0.993);
the accuracy-aware fallback covers them. Earlier measurements still hold: per-channel
weights beat per-tensor (+0.012); asymmetric activations beat symmetric (+0.002); 7-bit
weights cost 0.005 where the CPU has VNNI, so they are used only where it has not (there
u8 x s8 products saturate in int16).
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
    "depthwise": "a depthwise convolution's input is quantized per channel with the calibration faces' ranges; "
    "channels that carry colour are flat on grayscale faces and clip on colour ones (measured: 0.995 instead of "
    "0.989 on colour faces calibrated on grayscale ones); they are a few % of the MACs",
    "layers": "kept in float by the accuracy-aware fallback (most sensitive first)",
}
RANGE_ESTIMATORS = (
    "max_quantile",
    "nncf_default",  # NNCF's own choice per quantizer: true min/max per channel, averaged per tensor
    "minmax",
    "mean_minmax",
    "mean_quantile",
    "histogram",
    "median_minmax",
    "mean_no_outliers_minmax",
)
BIAS_CORRECTION = ("fast", "full", "none")
OVERFLOW_FIX = ("enable", "first_layer", "disable")
DEFAULT_CALIBRATION_COUNT = 300
# what the recipe needs from a calibration set (see arcdeploy.calibration_set)
MIN_CALIBRATION_FACES = 16
ADVISED_CALIBRATION_FACES = 100
# "depthwise": grouped convolutions whose filters see at most this many input channels each (a
# MobileFaceNet's first one has 2 per group): no sum over many channels averages their rounding out
DEPTHWISE_MAX_GROUP_INPUTS = 4


@dataclass(frozen=True)
class QuantRecipe:
    """How an int8 package is made (see the module doc)."""

    per_channel_weights: bool = True
    symmetric_activations: bool = False  # asymmetric: PReLU outputs are not centred on 0
    weight_bits: int = 8  # 7: the overflow fix in every layer
    overflow_fix: str = "disable"  # NNCF's OverflowFix for 8-bit weights (7-bit weights: always "enable")
    # activations: the widest of the images' own ranges, each image's most extreme 1e-5 of values left out
    range_estimator: str = "max_quantile"
    quantile_outlier_prob: float = 1e-5  # max_quantile: the share of each image's values outside its range
    bias_correction: str = "fast"
    calibration_count: int = DEFAULT_CALIBRATION_COUNT
    keep_float: tuple[str, ...] = ("stem", "spread", "depthwise", "head")
    spread_threshold: float = 10.0  # "spread": max / median of the per-channel input ranges
    float_layers: tuple[str, ...] = ()  # named layers kept in float (the fallback's choice)
    float_precision: FloatLayerPrecision = FloatLayerPrecision.F32  # what float layers execute in (OpenVINO CPU)
    ort_op_types: tuple[str, ...] = ("Conv",)  # ops quantize_static quantizes
    # the graph's input is uint8 pixels normalised by the input spec: its quantizer is put on their
    # exact grid ((0..255 - mean) / std, 256 levels), so a quantized stem loses nothing on its input
    # (OpenVINO; the detector packages' recipe there)
    pixel_input: bool = False

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
        if not 0 <= self.quantile_outlier_prob < 0.5:
            raise ArcdeployError(
                f"int8 recipe: quantile_outlier_prob must be in [0, 0.5), got {self.quantile_outlier_prob}"
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

    @classmethod
    def for_untrained_network(cls, **overrides: Any) -> QuantRecipe:
        """:meth:`for_this_cpu` with NNCF's own activation ranges, for a generated, UNTRAINED network
        (the demo's, the build tests'): the default's widest per-image ranges were chosen on trained
        networks, and an untrained IResNet misses its floor with them and goes to the fallback."""
        return cls.for_this_cpu(**{"range_estimator": "nncf_default", **overrides})

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
        pixels = ", the input quantized on the pixels' own grid" if self.pixel_input else ""
        return f"{weights}, {acts} activations ({self.range_estimator} ranges){pixels}, {bias}"

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
        group_inputs = _onnx_group_inputs(model)
        for n in nodes:
            if n.op_type == "Conv":
                group = next((a.i for a in n.attribute if a.name == "group"), 1)
                if (
                    group > 1
                    and group_inputs.get(n.input[1], DEPTHWISE_MAX_GROUP_INPUTS + 1) <= DEPTHWISE_MAX_GROUP_INPUTS
                ):
                    scope.add(n.name, "depthwise")
    if "head" in recipe.keep_float:
        idx = max((i for i, n in enumerate(nodes) if n.op_type in ("Gemm", "MatMul")), default=None)
        if idx is not None:
            for n in nodes[idx:]:
                scope.add(n.name, "head")
    for name in recipe.float_layers:
        scope.add(name, "layers")
    return scope


def _onnx_group_inputs(model) -> dict[str, int]:
    """Input channels each filter sees (dim 1) of each Conv weight initializer."""
    return {init.name: int(init.dims[1]) for init in model.graph.initializer if len(init.dims) == 4}


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
