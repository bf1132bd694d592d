"""What every model source provides: it says which files it takes, reads one (with the
options that kind of source understands) and exports it into a folder, self-checked.

A source module defines one :class:`ModelSource` subclass and names it ``SOURCE``; it is
listed in :mod:`arcdeploy.sources.registry`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ArcdeployError
from .verify import ExportResult

OPSET = 17  # the ONNX opset a traced export writes


class ModelSource(ABC):
    """One model file of one kind, ready to export."""

    kind: ClassVar[str]  # "checkpoint", "onnx": what the manifest's source.kind records
    label: ClassVar[str]  # the kind in words, for messages ("an ONNX source")
    options: ClassVar[tuple[str, ...]] = ()  # the keyword options this kind understands

    def __init__(self, path: str | os.PathLike, arch: str = "auto", opset: int = OPSET, **options: Any):
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise ArcdeployError(f"{', '.join('--' + k.replace('_', '-') for k in unknown)}: not for {self.label}")
        self.path = Path(path)
        self.arch = arch
        self.opset = opset

    @abstractmethod
    def export(self, out_dir: Path, force: bool = False) -> ExportResult:
        """Write the export folder ``out_dir`` (atomically: nothing is left when the check fails; an
        existing folder only with ``force``, or when it is empty and stays empty until the end)."""
