"""The typed values that travel from the command line to the engines.

Each is a ``StrEnum``: a member is its string (``Precision.INT8 == "int8"``), so manifests,
JSON results and comparisons with plain strings keep working, while code passes a type
that can only hold a value arcdeploy knows.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from .errors import ArcdeployError


class Precision(StrEnum):
    """What a package computes in."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"

    @classmethod
    def parse(cls, text: str) -> Precision:
        """``fp32`` / ``force_float32`` ... -> a :class:`Precision` (the reference pipeline's names are aliases)."""
        value = PRECISION_ALIASES.get(text, text)
        try:
            return cls(value)
        except ValueError:
            raise ArcdeployError(
                f"unknown precision {text!r}; choose one of {', '.join(cls)} (or {', '.join(PRECISION_ALIASES)})"
            ) from None

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """Every name the command line accepts: the precisions, then their aliases."""
        return (*cls, *PRECISION_ALIASES)


# not a precision: the request to choose one by evidence on this CPU (arcdeploy.auto_precision)
AUTO_PRECISION: Literal["auto"] = "auto"
PrecisionRequest = Precision | Literal["auto"]


def parse_precision_request(text: str) -> PrecisionRequest:
    """``auto``, or a precision (:meth:`Precision.parse`)."""
    return AUTO_PRECISION if text == AUTO_PRECISION else Precision.parse(text)


# the reference pipeline's names for the same modes
PRECISION_ALIASES: dict[str, Precision] = {
    "force_float32": Precision.FP32,
    "force_float16": Precision.FP16,
    "qint8_mixed_float16": Precision.INT8,
}


class FloatLayerPrecision(StrEnum):
    """What the layers an int8 model keeps in float execute in (OpenVINO CPU): f32, bf16, or the
    plugin's own choice (bf16 on CPUs with bf16 units)."""

    F32 = "f32"
    BF16 = "bf16"
    AUTO = "auto"


class Device(StrEnum):
    """Where a package runs, as its manifest records it."""

    CPU = "CPU"
    GPU = "GPU"  # an ONNX Runtime GPU provider (CUDA / TensorRT)
    CUDA = "cuda"  # a torch CUDA device
