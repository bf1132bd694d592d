"""Engine registry: name -> implementing class, imported only when used.

An engine whose library is missing fails with a message naming what to install.
"""
from __future__ import annotations

import importlib

from ..errors import ArcdeployError
from .base import Engine

# name: (module, class, pip requirement)
ENGINES: dict[str, tuple[str, str, str]] = {
    "openvino": ("arcdeploy.engines.openvino", "OpenVINOEngine", "openvino"),
    "onnxruntime": ("arcdeploy.engines.onnxruntime", "OnnxRuntimeEngine", "onnxruntime"),
    "torch": ("arcdeploy.engines.torch", "TorchEngine", "torch"),
}
# libraries each engine needs at run time (checked before import, for a clear message)
_REQUIRES = {"openvino": "openvino", "onnxruntime": "onnxruntime", "torch": "torch"}


def engine_class(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise ArcdeployError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    module_name, class_name, requirement = ENGINES[name]
    if importlib.util.find_spec(_REQUIRES[name]) is None:
        raise ArcdeployError(f"engine {name} is not installed: pip install {requirement}")
    module = importlib.import_module(module_name)
    return getattr(module, class_name)


__all__ = ["Engine", "ENGINES", "engine_class"]
