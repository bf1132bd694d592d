"""Engines: each module builds packages for its library and runs them (see :mod:`.base`)."""

from .base import BuildJob, Capabilities, Engine, GraphSession, Runtime, RuntimeInfo, StopRule, TensorInfo
from .registry import DEFAULT_ENGINE, ENGINE_MODULES, engine_names, get_engine, open_graph

__all__ = [
    "BuildJob",
    "Capabilities",
    "DEFAULT_ENGINE",
    "ENGINE_MODULES",
    "Engine",
    "GraphSession",
    "Runtime",
    "RuntimeInfo",
    "StopRule",
    "TensorInfo",
    "engine_names",
    "get_engine",
    "open_graph",
]
