"""What an export gives back, and the one self-check every source runs on it.

An export is checked number for number: each graph it wrote (the ONNX, and a checkpoint's
TorchScript) against the model it came from (eager PyTorch, or the foreign source as it is),
at several batch sizes, within a relative tolerance. A miss is a one-line error, and the
export folder is not written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError, first_line
from ..manifest import ExportManifest

TOLERANCE = 1e-4  # worst per-row relative L2 error an exported graph may show


@dataclass
class ExportResult:
    """An export folder: its ONNX (what engines build from), its fp32 reference (a checkpoint's
    TorchScript, or a foreign model's source ONNX) and its manifest."""

    out_dir: Path
    onnx_path: Path
    reference_path: Path
    manifest: ExportManifest


def verification_inputs(n: int, seed: int = 0, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Inputs for an export's self-check: seeded values in the normalised range [-1, 1].

    The check compares two implementations of the same network number for number;
    the content of the images does not matter, only that every path is exercised."""
    rng = np.random.default_rng(1000 + seed)
    return rng.uniform(-1.0, 1.0, size=(n, 3, *size)).astype(np.float32)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Worst per-row relative L2 error of ``out`` against ``ref``; infinite when the shapes differ
    (NaN stays NaN and fails every limit)."""
    if out.shape != ref.shape:
        return float("inf")
    num = np.linalg.norm(out.astype(np.float64) - ref, axis=1)
    den = np.maximum(np.linalg.norm(ref.astype(np.float64), axis=1), 1e-12)
    return float(np.max(num / den))


@dataclass
class SelfCheck:
    """The relative error of each checked graph at each batch, and its output at the largest."""

    errors: dict[str, dict[int, float]]
    outputs: dict[str, np.ndarray]

    def worst(self, name: str) -> float:
        return float(np.max(list(self.errors[name].values())))  # NaN propagates (max() would drop it)


def check_export(
    what: str,
    graphs: dict[str, Callable[[np.ndarray], np.ndarray]],
    reference: Callable[[np.ndarray], np.ndarray],
    inputs: np.ndarray,
    batches: tuple[int, ...],
    against: str,
    tolerance: float = TOLERANCE,
) -> SelfCheck:
    """Run each of ``graphs`` and ``reference`` on the first ``b`` of ``inputs`` for every batch ``b``;
    an ArcdeployError naming ``what`` when a graph fails, gives another shape, or differs by more
    than ``tolerance``."""
    errors: dict[str, dict[int, float]] = {name: {} for name in graphs}
    outputs: dict[str, np.ndarray] = {}
    for b in batches:
        x = inputs[:b]
        ref = np.asarray(reference(x))
        for name, run in graphs.items():
            try:
                out = np.asarray(run(x))
            except ArcdeployError as exc:
                raise ArcdeployError(f"{what}: {name} fails at batch {b}: {exc}") from None
            except Exception as exc:
                raise ArcdeployError(f"{what}: {name} fails at batch {b}: {first_line(exc, limit=2000)}") from None
            if out.shape != ref.shape:
                raise ArcdeployError(
                    f"{what}: {name} output shape {list(out.shape)} at batch {b}, expected {list(ref.shape)}"
                )
            err = errors[name][b] = relative_error(out, ref)
            if not err <= tolerance:
                raise ArcdeployError(
                    f"{what}: {name} differs from {against} at batch {b} by relative error {err:.2e} "
                    f"(limit {tolerance:.0e})"
                )
            outputs[name] = out
    return SelfCheck(errors, outputs)
