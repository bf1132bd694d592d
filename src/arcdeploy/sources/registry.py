"""The model sources arcdeploy knows: one line each. A source module is imported only when a
file of its kind is exported (reading checkpoints needs torch; a foreign ONNX does not)."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from ..errors import ArcdeployError
from .base import OPSET, ModelSource

# source kind -> (module defining SOURCE, the file suffixes it takes; none: every other file)
SOURCE_MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "onnx": ("arcdeploy.sources.onnx_model", (".onnx",)),
    "checkpoint": ("arcdeploy.sources.checkpoint", ()),
}


def source_kind(path: str | os.PathLike) -> str:
    """The kind of source a file is, by its name: the first kind that takes its suffix, else the
    kind that takes every other file."""
    suffix = Path(path).suffix.lower()
    fallback = None
    for kind, (_, suffixes) in SOURCE_MODULES.items():
        if suffix in suffixes:
            return kind
        if not suffixes and fallback is None:
            fallback = kind
    assert fallback is not None, "one source kind must take every other file"
    return fallback


def source_class(kind: str) -> type[ModelSource]:
    return importlib.import_module(SOURCE_MODULES[kind][0]).SOURCE


def open_source(path: str | os.PathLike, arch: str = "auto", opset: int = OPSET, **options) -> ModelSource:
    """``path`` as a :class:`ModelSource` of its kind, with the ``options`` that kind takes."""
    cls = source_class(source_kind(path))
    unknown = [k for k in options if k not in cls.options]
    if unknown:
        owners = [c.label for c in map(source_class, SOURCE_MODULES) if set(unknown) <= set(c.options)]
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ArcdeployError(f"{flags}: only for {' or '.join(owners)}" if owners else f"{flags}: not for {cls.label}")
    return cls(path, arch=arch, opset=opset, **options)
