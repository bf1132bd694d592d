"""Checkpoint -> ONNX (dynamic batch) + TorchScript, verified against PyTorch.

The ONNX keeps insightface's input convention (SPEC section 3): RGB NCHW
float32 112x112 normalised (x - 127.5) / 127.5, output [N, 512] raw
embeddings, named ``input`` / ``embedding``, with a real dynamic batch axis
(never a batch-1 trace renamed afterwards, which breaks mbf at batch > 1).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_backbone
from .errors import ArcdeployError
from .utils import atomic_dir, library_versions, sha256_file, write_json_atomic

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
# SPEC section 3; recorded in every manifest
INPUT_CONVENTION = {
    "layout": "NCHW",
    "color": "RGB",
    "dtype": "float32",
    "size": [112, 112],
    "normalize": {"mean": 127.5, "std": 127.5},
    "name": INPUT_NAME,
}
EXPORT_TOLERANCE = 1e-4
VERIFY_BATCHES = (1, 5)


@dataclass
class ExportResult:
    out_dir: Path
    onnx_path: Path
    torchscript_path: Path
    manifest: dict


def reference_inputs(n: int, seed: int = 0) -> np.ndarray:
    """Normalised NCHW inputs for self-checks: synthetic aligned faces."""
    from .synth import aligned_faces

    faces = aligned_faces(n, seed=seed + 100)
    return (faces.transpose(0, 3, 1, 2).astype(np.float32) - 127.5) / 127.5


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Worst per-row relative L2 error of ``out`` against ``ref``."""
    num = np.linalg.norm(out.astype(np.float64) - ref, axis=1)
    den = np.maximum(np.linalg.norm(ref.astype(np.float64), axis=1), 1e-12)
    return float(np.max(num / den))


def export(ckpt: str | os.PathLike, out_dir: str | os.PathLike, arch: str = "auto",
           force: bool = False, opset: int = OPSET) -> ExportResult:
    """Export a checkpoint to ``out_dir`` (model.onnx, model.pt, manifest.json).

    Fails, leaving nothing behind, unless ONNX Runtime and TorchScript match
    PyTorch within a relative error of 1e-4 at batch 1 and 5.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ArcdeployError(f"{out_dir}: already exists; use --force to replace it")
    model, ckpt_info = load_backbone(ckpt, arch)

    try:
        with atomic_dir(out_dir, force=True) as tmp:
            onnx_path, ts_path = tmp / "model.onnx", tmp / "model.pt"
            example = torch.from_numpy(reference_inputs(2))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model, (example,), str(onnx_path), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
                traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(ts_path))
            verification = verify_export(model, onnx_path, ts_path)
            manifest = {
                "format": "arcdeploy-export/1",
                "arch": ckpt_info.arch,
                "source": {
                    "path": str(Path(ckpt).resolve()),
                    "sha256": sha256_file(ckpt),
                    "notes": ckpt_info.notes,
                },
                "input": INPUT_CONVENTION,
                "output": {"name": OUTPUT_NAME, "shape": ["batch", 512], "normalized": False},
                "files": {"onnx": "model.onnx", "torchscript": "model.pt"},
                "opset": opset,
                "dynamic_batch": True,
                "verification": verification,
                "versions": library_versions("arcdeploy", "torch", "onnx", "onnxruntime"),
            }
            write_json_atomic(tmp / "manifest.json", manifest)
    except ArcdeployError:
        raise
    except Exception as exc:  # the exporter's own failures, reported in one line
        raise ArcdeployError(f"{ckpt}: export failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    return ExportResult(out_dir, out_dir / "model.onnx", out_dir / "model.pt", manifest)


def verify_export(model: torch.nn.Module, onnx_path: Path, ts_path: Path) -> dict:
    """Compare ONNX Runtime and TorchScript with eager PyTorch at batch 1 and 5."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    traced = torch.jit.load(str(ts_path))
    x = reference_inputs(max(VERIFY_BATCHES), seed=1)
    result = {"tolerance": EXPORT_TOLERANCE, "batches": list(VERIFY_BATCHES)}
    worst = {"onnx": 0.0, "torchscript": 0.0}
    with torch.no_grad():
        for b in VERIFY_BATCHES:
            xb = x[:b]
            ref = model(torch.from_numpy(xb)).numpy()
            onnx_out = sess.run(None, {INPUT_NAME: xb})[0]
            ts_out = traced(torch.from_numpy(xb)).numpy()
            for name, out in (("onnx", onnx_out), ("torchscript", ts_out)):
                if out.shape != ref.shape:
                    raise ArcdeployError(f"{onnx_path.name}: {name} output shape {out.shape} at batch {b}, expected {ref.shape}")
                worst[name] = max(worst[name], relative_error(out, ref))
    for name, err in worst.items():
        if not err <= EXPORT_TOLERANCE:
            raise ArcdeployError(f"export check failed: {name} differs from PyTorch by relative error {err:.2e} (limit {EXPORT_TOLERANCE:.0e})")
    result["relative_error"] = worst
    return result
