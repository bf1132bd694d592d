"""The small interface every engine implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Engine(ABC):
    """A compiled model of one package, ready to run batches.

    ``infer`` takes a batch in the package's input format (``manifest["input"]``:
    float32 NCHW normalised, or uint8 NHWC RGB when preprocessing is folded into
    the graph) and returns raw float32 embeddings [N, 512].
    """

    name: str = "engine"

    def __init__(self, package_dir: Path, manifest: dict, threads: int | None = None, **options):
        self.package_dir = Path(package_dir)
        self.manifest = manifest
        self.threads = threads
        self.options = options

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """Run one batch; returns float32 [N, 512]."""

    def infer_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Run several batches; engines that can overlap them (OpenVINO's async
        infer requests) override this. Results come back in input order."""
        return [self.infer(b) for b in batches]

    def describe(self) -> dict:
        """What is running: engine, device, precision, threads, library version."""
        return {"engine": self.name, "precision": self.manifest.get("precision"), "threads": self.threads}
