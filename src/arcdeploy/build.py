"""Build: an exported model -> a package for one engine and precision.

(Minimal first version: ONNX Runtime fp32. Engines, precisions, calibration
and the fidelity check are added on top of this shape.)
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ArcdeployError
from .package import PACKAGE_FORMAT
from .utils import atomic_dir, library_versions, write_json_atomic

PRECISION_ALIASES = {
    "force_float32": "fp32",
    "force_float16": "fp16",
    "qint8_mixed_float16": "int8",
}
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def normalize_precision(precision: str) -> str:
    p = PRECISION_ALIASES.get(precision, precision)
    if p not in PRECISIONS:
        raise ArcdeployError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)} "
                             f"(or {', '.join(PRECISION_ALIASES)})")
    return p


def resolve_source(src: str | os.PathLike, workdir: Path, arch: str = "auto") -> Path:
    """An export folder for ``src``: a checkpoint (exported into ``workdir``), an export folder, or a model.onnx."""
    src = Path(src)
    if not src.exists():
        raise ArcdeployError(f"{src}: no such file or folder")
    if src.is_dir():
        if not (src / "manifest.json").exists() or not (src / "model.onnx").exists():
            raise ArcdeployError(f"{src}: not an export folder (needs model.onnx and manifest.json)")
        return src
    if src.suffix == ".onnx":
        if (src.parent / "manifest.json").exists():
            return src.parent
        raise ArcdeployError(f"{src}: an ONNX file without the manifest.json that arcdeploy export writes beside it")
    from .export import export

    return export(src, workdir / "export", arch=arch).out_dir


def build(src, out, engine: str = "openvino", precision: str = "fp32", calib=None, calib_landmarks=None,
          batch: int | None = None, threads: int | None = None, arch: str = "auto", force: bool = False,
          strict: bool = False, **options) -> Path:
    precision = normalize_precision(precision)
    out = Path(out)
    if out.exists() and not force:
        raise ArcdeployError(f"{out}: already exists; use --force to replace it")
    with tempfile.TemporaryDirectory(prefix="arcdeploy-build-") as work:
        export_dir = resolve_source(src, Path(work), arch)
        export_manifest = json.loads((export_dir / "manifest.json").read_text())
        if engine != "onnxruntime" or precision != "fp32":
            raise ArcdeployError(f"engine {engine} precision {precision}: not available yet")
        with atomic_dir(out, force=True) as tmp:
            shutil.copyfile(export_dir / "model.onnx", tmp / "model.onnx")
            manifest = {
                "format": PACKAGE_FORMAT,
                "engine": engine,
                "precision": precision,
                "device": "CPU",
                "arch": export_manifest["arch"],
                "input": dict(export_manifest["input"]),
                "batch": batch,
                "dynamic_batch": True,
                "files": {"model": "model.onnx"},
                "calibration": None,
                "source": export_manifest["source"],
                "export": {"opset": export_manifest["opset"]},
                "versions": library_versions("arcdeploy", "onnxruntime"),
            }
            write_json_atomic(tmp / "manifest.json", manifest)
    return out
