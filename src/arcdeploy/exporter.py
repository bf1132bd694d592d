"""Export: a model source -> an export folder (verified ONNX + fp32 reference + manifest).

Sources:
- an arcface_torch checkpoint (``backbone.pth``): traced to ONNX with a real dynamic
  batch axis (never a batch-1 trace renamed afterwards, which breaks mbf at batch > 1)
  and to TorchScript, the package's fp32 reference. The ONNX keeps insightface's
  input convention: RGB NCHW float32 112x112, ``(x - 127.5) / 127.5``, output [N, 512]
  raw embeddings, named ``input`` / ``embedding``.
- a foreign ArcFace-family ONNX file: see :mod:`arcdeploy.sources.onnx_model`.

An export checks itself (ONNX Runtime and TorchScript against eager PyTorch at
batch 1 and 5) and leaves nothing behind when the check fails.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ArcdeployError, describe
from .files import atomic_dir, refuse_existing, write_json_atomic
from .manifest import (
    MANIFEST_NAME,
    ExportManifest,
    InputSpec,
    OutputSpec,
    ReferenceSpec,
    SourceRecord,
    VerificationRecord,
)
from .utils import library_versions, sha256_file

OPSET = 17
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
EXPORT_TOLERANCE = 1e-4
VERIFY_BATCHES = (1, 5)


@dataclass
class ExportResult:
    out_dir: Path
    onnx_path: Path
    reference_path: Path
    manifest: ExportManifest

    @property
    def torchscript_path(self) -> Path:
        return self.reference_path


def verification_inputs(n: int, seed: int = 0, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Inputs for an export's self-check: seeded values in the normalised range [-1, 1].

    The check compares two implementations of the same network number for number;
    the content of the images does not matter, only that every path is exercised."""
    rng = np.random.default_rng(1000 + seed)
    return rng.uniform(-1.0, 1.0, size=(n, 3, *size)).astype(np.float32)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """Worst per-row relative L2 error of ``out`` against ``ref``."""
    num = np.linalg.norm(out.astype(np.float64) - ref, axis=1)
    den = np.maximum(np.linalg.norm(ref.astype(np.float64), axis=1), 1e-12)
    return float(np.max(num / den))


def is_onnx_source(src: str | os.PathLike) -> bool:
    return Path(src).suffix.lower() == ".onnx"


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    arch: str = "auto",
    force: bool = False,
    opset: int = OPSET,
    **onnx_options,
) -> ExportResult:
    """Export ``src`` (a checkpoint, or a foreign ONNX file) into ``out_dir``.

    ``onnx_options`` (foreign ONNX only): ``input_mean``, ``input_std``, ``bgr``; see
    :func:`arcdeploy.sources.onnx_model.export_onnx`.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        refuse_existing(out_dir, force)
    if is_onnx_source(src):
        from .sources.onnx_model import export_onnx

        return export_onnx(src, out_dir, force=True, **onnx_options)
    if onnx_options:
        raise ArcdeployError(f"{', '.join('--' + k.replace('_', '-') for k in onnx_options)}: only for an ONNX source")
    return export_checkpoint(src, out_dir, arch=arch, opset=opset)


def export_checkpoint(ckpt: str | os.PathLike, out_dir: Path, arch: str = "auto", opset: int = OPSET) -> ExportResult:
    """A checkpoint -> ``out_dir`` (model.onnx, model.pt, manifest.json), verified."""
    import torch

    from .sources.checkpoint import load_backbone

    model, info = load_backbone(ckpt, arch)
    try:
        with atomic_dir(out_dir, force=True) as tmp:
            onnx_path, ts_path = tmp / "model.onnx", tmp / "model.pt"
            example = torch.from_numpy(verification_inputs(2))
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(onnx_path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
                traced = torch.jit.trace(model, example, check_trace=False)
                torch.jit.save(traced, str(ts_path))
                dim = int(model(example).shape[1])
            verification = verify_export(model, onnx_path, ts_path)
            manifest = ExportManifest(
                arch=info.arch,
                input=InputSpec(name=INPUT_NAME),
                output=OutputSpec(name=OUTPUT_NAME, dim=dim),
                files={"onnx": "model.onnx", "torchscript": "model.pt"},
                reference=ReferenceSpec(file="model.pt", kind="torchscript", sha256=sha256_file(ts_path)),
                source=SourceRecord(
                    kind="checkpoint", path=str(Path(ckpt).resolve()), sha256=sha256_file(ckpt), notes=info.notes
                ),
                opset=opset,
                dynamic_batch=True,
                verification=verification,
                versions=library_versions("arcdeploy", "torch", "onnx", "onnxruntime"),
            )
            write_json_atomic(tmp / MANIFEST_NAME, manifest.to_json())
    except ArcdeployError:
        raise
    except Exception as exc:  # the exporter's own failures, reported in one line
        raise ArcdeployError(f"{ckpt}: export failed ({describe(exc)})") from None
    return ExportResult(out_dir, out_dir / "model.onnx", out_dir / "model.pt", manifest)


def verify_export(model, onnx_path: Path, ts_path: Path) -> VerificationRecord:
    """Compare ONNX Runtime and TorchScript with eager PyTorch at batch 1 and 5."""
    import torch

    from .engines import open_graph

    sess = open_graph(onnx_path, engine="onnxruntime")
    traced = open_graph(ts_path, engine="torch")
    x = verification_inputs(max(VERIFY_BATCHES), seed=1)
    errors: dict[str, list[float]] = {"onnx": [], "torchscript": []}
    with torch.no_grad():
        for b in VERIFY_BATCHES:
            xb = x[:b]
            ref = model(torch.from_numpy(xb)).numpy()
            for name, runner in (("onnx", sess), ("torchscript", traced)):
                out = runner.run_one(xb)
                if out.shape != ref.shape:
                    raise ArcdeployError(
                        f"{onnx_path.name}: {name} output shape {list(out.shape)} at batch {b}, "
                        f"expected {list(ref.shape)}"
                    )
                errors[name].append(relative_error(out, ref))
    worst = {name: float(np.max(errs)) for name, errs in errors.items()}  # NaN propagates (max() would drop it)
    for name, err in worst.items():
        if not err <= EXPORT_TOLERANCE:
            raise ArcdeployError(
                f"export check failed: {name} differs from PyTorch by relative error {err:.2e} "
                f"(limit {EXPORT_TOLERANCE:.0e})"
            )
    return VerificationRecord(tolerance=EXPORT_TOLERANCE, batches=list(VERIFY_BATCHES), relative_error=worst)
