"""A package: a folder with manifest.json and the engine's files.

``load(PKG)`` returns a :class:`Package`: the validated manifest, and the engine's
runtime opened on first use. ``Package.infer`` runs aligned crops, ``Package.embed``
image files or arrays. Both may be called from several threads at once. Loading does
not import torch unless the package's engine is torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .engines import Runtime, RuntimeInfo, get_engine
from .engines.runner import CropRunner
from .errors import ArcdeployError, describe
from .machine import check_threads
from .manifest import MANIFEST_NAME, InputSpec, OutputSpec, PackageManifest, read_package_manifest
from .utils import hash_file_into


class Package:
    """A built model: its manifest and a lazily opened runtime."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None, **engine_options: Any):
        self.path = Path(path)
        self.manifest: PackageManifest = read_package_manifest(self.path)
        self.threads = check_threads(threads)
        self.engine_options = dict(engine_options)
        self._runtime: Runtime | None = None
        self._runner: CropRunner | None = None
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        self._closed = False

    # ---- the runtime
    @property
    def runtime(self) -> Runtime:
        if self._runtime is None:
            with self._lock:
                if self._closed:
                    raise ArcdeployError(f"{self.path}: the package was closed; load it again to use it")
                if self._runtime is None:
                    self._runtime = self._open_runtime()
        return self._runtime

    def close(self) -> None:
        """Free the engine (its compiled model and memory) now rather than when collected; the
        package cannot run afterwards. Closing twice is allowed."""
        with self._lock:
            runtime, self._runtime, self._runner, self._closed = self._runtime, None, None, True
        if runtime is not None:
            runtime.close()

    def __enter__(self) -> Package:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def loaded(self) -> bool:
        return self._runtime is not None

    def _open_runtime(self) -> Runtime:
        engine = get_engine(self.manifest.engine)
        try:
            return engine.runtime(self.path, self.manifest, threads=self.threads, **self.engine_options)
        except ArcdeployError:
            raise
        except Exception as exc:
            raise ArcdeployError(f"{self.path}: the {engine.name} engine failed to load it ({describe(exc)})") from None

    # ---- what it takes and gives
    @property
    def input_spec(self) -> InputSpec:
        return self.manifest.input

    @property
    def output_spec(self) -> OutputSpec:
        return self.manifest.output

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model was compiled for, or None when dynamic."""
        return self.manifest.fixed_batch

    def to_model_input(self, faces: np.ndarray) -> np.ndarray:
        return self.manifest.input.to_model_input(faces)

    # ---- running
    @property
    def runner(self) -> CropRunner:
        """The runtime fed aligned crops through the package's input spec (a fixed batch padded)."""
        runner = self._runner
        if runner is None:
            runner = self._runner = CropRunner(self.runtime.infer, self.manifest.input, batch=self.fixed_batch)
        return runner

    def infer(self, faces: np.ndarray) -> np.ndarray:
        """Raw float32 embeddings [N, D] of aligned uint8 RGB crops [N, 112, 112, 3]."""
        return self.runner(faces)

    def infer_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Several batches of aligned crops, results in order; engines with async requests
        keep them in flight together."""
        xs = [self.to_model_input(b) for b in batches]
        fixed = self.fixed_batch
        if fixed and any(x.shape[0] != fixed for x in xs):
            return [self.infer(b) for b in batches]
        return self.runtime.infer_many(xs)

    def embed(
        self, images, landmarks=None, flip: bool = False, raw: bool = False, batch: int | None = None, detector=None
    ) -> np.ndarray:
        """Embeddings of image paths or RGB arrays (see :func:`arcdeploy.faces.pipeline.embed_images`);
        ``detector`` (a detector file or an opened detector) finds each image's face instead of landmarks."""
        from .faces.pipeline import embed_images

        return embed_images(self, images, landmarks=landmarks, flip=flip, raw=raw, batch=batch, detector=detector)

    def describe(self) -> RuntimeInfo:
        return self.runtime.describe()

    # ---- identity
    def fingerprint(self) -> str:
        """sha256 over manifest.json and every file it names (what a cached result depends on)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update((self.path / MANIFEST_NAME).read_bytes())
            names = sorted(
                set(self.manifest.files.values())
                | ({self.manifest.reference.file} if self.manifest.reference else set())
            )
            for name in names:
                p = self.path / name
                if p.is_file():
                    h.update(name.encode())
                    hash_file_into(h, p)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        m = self.manifest
        return f"Package({str(self.path)!r}, arch={m.arch}, engine={m.engine}, precision={m.precision})"


def load(path: str | os.PathLike | Package, threads: int | None = None, **engine_options: Any) -> Package:
    """Open a built package; a :class:`Package` passed in is returned as it is."""
    if isinstance(path, Package):
        return path
    return Package(path, threads=threads, **engine_options)


def read_manifest(path: str | os.PathLike) -> dict:
    """The package's manifest as plain JSON (validated)."""
    return read_package_manifest(path).to_json()
