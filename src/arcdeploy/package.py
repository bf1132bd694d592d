"""A package: a folder with manifest.json and the engine's files.

``load(PKG)`` returns a :class:`Package` that runs aligned crops through the
engine (``infer``) and embeds image files or arrays (``embed``). Loading does
not import torch unless the package's engine is torch.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .engines import engine_class
from .errors import ArcdeployError
from .faces.preprocess import to_model_input

PACKAGE_FORMAT = "arcdeploy-package/1"


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path)
    mf = path / "manifest.json" if path.is_dir() else path
    if not path.exists():
        raise ArcdeployError(f"{path}: no such package")
    if not mf.exists():
        raise ArcdeployError(f"{path}: not a package (no manifest.json)")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as exc:
        raise ArcdeployError(f"{mf}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArcdeployError(f"{mf}: manifest is not a JSON object")
    return manifest


class Package:
    """A built model: its manifest and a lazily created engine."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, **engine_options):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if self.manifest.get("format") != PACKAGE_FORMAT:
            raise ArcdeployError(f"{self.path}: not a built package (format {self.manifest.get('format')!r}); run arcdeploy build first")
        self.threads = threads
        self.engine_options = engine_options
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            cls = engine_class(self.manifest["engine"])
            self._engine = cls(self.path, self.manifest, threads=self.threads, **self.engine_options)
        return self._engine

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was compiled for, or None when dynamic."""
        b = self.manifest.get("batch")
        return int(b) if b and not self.manifest.get("dynamic_batch", True) else None

    @property
    def input_format(self) -> dict:
        return self.manifest["input"]

    def infer(self, faces: np.ndarray) -> np.ndarray:
        """Raw float32 embeddings [N, 512] of aligned uint8 RGB crops [N, 112, 112, 3]."""
        x = to_model_input(faces, self.input_format)
        n = x.shape[0]
        fixed = self.fixed_batch
        if not fixed or n == fixed:
            return self.engine.infer(x)
        outs = []
        for start in range(0, n, fixed):
            chunk = x[start:start + fixed]
            pad = fixed - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
            outs.append(self.engine.infer(chunk)[: fixed - pad])
        return np.concatenate(outs)

    def infer_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Several batches of aligned crops at once, results in order. The OpenVINO
        engine keeps them in flight on parallel infer requests (load the package
        with ``performance_hint="THROUGHPUT"``); other engines run them one by one."""
        xs = [to_model_input(b, self.input_format) for b in batches]
        fixed = self.fixed_batch
        if fixed and any(x.shape[0] != fixed for x in xs):
            return [self.infer(b) for b in batches]
        return self.engine.infer_many(xs)

    def embed(self, images, landmarks=None, flip: bool = False, raw: bool = False, batch: int | None = None) -> np.ndarray:
        """Embeddings of image paths or RGB arrays (see :func:`arcdeploy.faces.pipeline.embed_images`)."""
        from .faces.pipeline import embed_images

        return embed_images(self, images, landmarks=landmarks, flip=flip, raw=raw, batch=batch)

    def describe(self) -> dict:
        return self.engine.describe()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Package({str(self.path)!r}, arch={m.get('arch')}, engine={m.get('engine')}, precision={m.get('precision')})"


def load(path, threads: int | None = None, **engine_options) -> Package:
    """Open a built package; a :class:`Package` passed in is returned as it is."""
    if isinstance(path, Package):
        return path
    return Package(path, threads=threads, **engine_options)
