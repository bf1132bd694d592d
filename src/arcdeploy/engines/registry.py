"""The engines arcdeploy knows: one line each. A module is imported only when its engine is used,
and an engine whose library is missing says what to install."""

from __future__ import annotations

import importlib
import importlib.util

from ..errors import ArcdeployError
from .base import Engine

# engine name -> (module defining ENGINE, import name of its library, pip requirement)
ENGINE_MODULES: dict[str, tuple[str, str, str]] = {
    "openvino": ("arcdeploy.engines.openvino", "openvino", "openvino"),
    "onnxruntime": ("arcdeploy.engines.onnxruntime", "onnxruntime", "onnxruntime"),
    "torch": ("arcdeploy.engines.torch", "torch", "torch"),
}
DEFAULT_ENGINE = "openvino"
# which engine runs each kind of fp32 reference a package stores
REFERENCE_ENGINES = {"torchscript": "torch", "onnx": "onnxruntime"}


def engine_names() -> tuple[str, ...]:
    return tuple(ENGINE_MODULES)


def get_engine(name: str) -> Engine:
    """The :class:`Engine` called ``name``; a clear error when unknown or not installed."""
    if name not in ENGINE_MODULES:
        raise ArcdeployError(f"unknown engine {name!r}; choose one of {', '.join(ENGINE_MODULES)}")
    module_name, library, requirement = ENGINE_MODULES[name]
    if importlib.util.find_spec(library) is None:
        raise ArcdeployError(f"engine {name} is not installed: pip install {requirement}")
    return importlib.import_module(module_name).ENGINE


def open_graph(path, engine: str = "onnxruntime", threads: int | None = None, **options):
    """Run any ONNX file (a detector, a foreign model) with ``engine``: a :class:`GraphSession`."""
    eng = get_engine(engine)
    if eng.open_graph is None:
        raise ArcdeployError(f"engine {engine} cannot run ONNX graphs directly")
    return eng.open_graph(path, threads=threads, **options)
