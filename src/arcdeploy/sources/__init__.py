"""Where models come from: arcface_torch checkpoints (:mod:`.checkpoint`) and foreign
ArcFace-family ONNX files (:mod:`.onnx_model`). Each becomes an export folder
(:mod:`arcdeploy.export`), which is what the build stage takes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ArcdeployError
from ..manifest import EXPORT_FORMAT_NAME, MANIFEST_NAME, read_export_manifest


def _is_export_folder(folder: Path) -> bool:
    mf = folder / MANIFEST_NAME
    if not mf.is_file():
        return False
    try:
        fmt = json.loads(mf.read_text(encoding="utf-8")).get("format", "")
    except (OSError, ValueError, AttributeError, UnicodeDecodeError):
        return False
    return isinstance(fmt, str) and fmt.startswith(EXPORT_FORMAT_NAME + "/")


def resolve_export(src: str | os.PathLike, workdir: Path, arch: str = "auto", **onnx_options) -> Path:
    """An export folder for ``src``: an export folder as it is, the folder of an exported
    model.onnx, or ``src`` (a checkpoint or a foreign ONNX) exported into ``workdir/export``."""
    from ..exporter import export, is_onnx_source

    src = Path(src)
    if not src.exists():
        raise ArcdeployError(f"{src}: no such file or folder")
    if src.is_dir():
        if not _is_export_folder(src):
            raise ArcdeployError(f"{src}: not an export folder (needs the manifest.json that arcdeploy export writes)")
        read_export_manifest(src)  # validated here, before any work
        if onnx_options:
            raise ArcdeployError(
                f"{src}: an export folder already records its input convention; "
                "pass --input-mean/--input-std/--bgr when exporting the ONNX file"
            )
        return src
    if is_onnx_source(src) and _is_export_folder(src.parent) and not onnx_options:
        return src.parent
    return export(src, workdir / "export", arch=arch, force=True, **onnx_options).out_dir
