"""Export: a model source -> an export folder (verified ONNX + fp32 reference + manifest).

Each kind of source is one class in :mod:`arcdeploy.sources` (an arcface_torch checkpoint,
a foreign ArcFace-family ONNX file), listed in :mod:`arcdeploy.sources.registry`; every
export checks itself (:mod:`arcdeploy.sources.verify`) and leaves nothing behind when the
check fails.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import ArcdeployError
from .files import FileLock, refuse_existing
from .manifest import EXPORT_FORMAT_NAME, MANIFEST_NAME, read_export_manifest
from .sources.base import OPSET
from .sources.registry import open_source, source_kind
from .sources.verify import ExportResult


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    arch: str = "auto",
    force: bool = False,
    opset: int = OPSET,
    **source_options,
) -> ExportResult:
    """Export ``src`` (a checkpoint, or a foreign ONNX file) into ``out_dir``.

    ``arch`` and ``opset``: a checkpoint's; ``source_options``: what the kind of source takes
    (a foreign ONNX: ``input_mean``, ``input_std``, ``bgr``; see :class:`arcdeploy.sources.onnx_model.OnnxSource`).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        refuse_existing(out_dir, force)
    source = open_source(src, arch=arch, opset=opset, **source_options)
    with FileLock(out_dir):  # a second export into the same folder is refused, not raced
        return source.export(out_dir, force=force)


def is_export_folder(folder: Path) -> bool:
    mf = folder / MANIFEST_NAME
    if not mf.is_file():
        return False
    try:
        fmt = json.loads(mf.read_text(encoding="utf-8")).get("format", "")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False
    return isinstance(fmt, str) and fmt.startswith(EXPORT_FORMAT_NAME + "/")


def resolve_export(src: str | os.PathLike, workdir: Path, arch: str = "auto", **source_options) -> Path:
    """An export folder for ``src``: an export folder as it is, the folder of an exported
    model.onnx, or ``src`` (a checkpoint or a foreign ONNX) exported into ``workdir/export``."""
    src = Path(src)
    if not src.exists():
        raise ArcdeployError(f"{src}: no such file or folder")
    if src.is_dir():
        if not is_export_folder(src):
            raise ArcdeployError(f"{src}: not an export folder (needs the manifest.json that arcdeploy export writes)")
        read_export_manifest(src)  # validated here, before any work
        if source_options:
            raise ArcdeployError(
                f"{src}: an export folder already records its input convention; "
                "pass --input-mean/--input-std/--bgr when exporting the ONNX file"
            )
        return src
    if source_kind(src) == "onnx" and is_export_folder(src.parent) and not source_options:
        return src.parent
    return export(src, workdir / "export", arch=arch, force=True, **source_options).out_dir
