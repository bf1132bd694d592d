"""The gallery's Python API: open a gallery, enrol and search with a package.

::

    from arcdeploy.gallery import open_gallery
    with open_gallery("staff/", write=True) as g:           # or "postgresql://host/db"
        g.add_images("pkg-int8/", ["ann/1.jpg", "bob/1.jpg"], ["ann", "bob"], detector="scrfd_500m_kps.onnx")
    with open_gallery("staff/") as g:
        results, failures = g.search_images("pkg-fp32/", ["door.jpg"], detector="scrfd_500m_kps.onnx")

Every vector is checked against the gallery's model first (:func:`check_model`): a package of
another model is refused in one line; packages of the same source at any precision are not.
Images are embedded through :func:`embed_for_gallery`, the one place this package calls the
embed pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError
from ..faces.types import Failure
from .store import (
    DEFAULT_TOP_K,
    GalleryInfo,
    GalleryStore,
    ModelIdentity,
    SearchResult,
    apply_threshold,
    check_model,
    check_names,
    unit_rows,
)


@dataclass
class AddResult:
    added: int
    identities: list[str]  # the identities enrolled into by this add
    failures: list[Failure] = field(default_factory=list)


# ------------------------------------------------------------------ the one adapter to the embed pipeline


def embed_for_gallery(
    package, paths: Sequence, landmarks=None, detector=None, root=None, progress: bool = False
) -> tuple[np.ndarray, list[Failure]]:
    """Embeddings [N, D] (L2-normalised; a failed image's row is NaN) of image files, and the
    failures: an embed job run here, as ``arcdeploy embed`` runs it."""
    from ..faces.job import EmbedJob
    from ..faces.pipeline import run_local

    job = EmbedJob.create(list(paths), landmarks=landmarks, detector=detector, root=root, progress=progress)
    res = run_local(job, package)
    return np.asarray(res.features, dtype=np.float32), list(res.failures)


# ------------------------------------------------------------------ packages and models


def _package(package):
    from ..package import Package, load

    return package if isinstance(package, Package) else load(package)


def model_of(package) -> tuple[ModelIdentity, dict]:
    """The model identity of a package (a path or :class:`Package`; a :class:`ModelIdentity`
    is taken as it is) and where vectors come from (package, engine, precision)."""
    if isinstance(package, ModelIdentity):
        return package, {"package": "(features)", "engine": None, "precision": None}
    pkg = _package(package)
    m = pkg.manifest
    return ModelIdentity.from_manifest(m, str(pkg.path)), {
        "package": str(pkg.path),
        "engine": m.engine,
        "precision": m.precision,
    }


# ------------------------------------------------------------------ identities from the inputs


def identities_from_folder(root: str | os.PathLike, paths: Sequence) -> list[str]:
    """``DIR/<identity>/...``: each image's identity is its first folder below ``root``."""
    root = Path(root)
    out = []
    for p in paths:
        try:
            parts = Path(p).relative_to(root).parts
        except ValueError:
            raise ArcdeployError(f"{p}: not inside {root}") from None
        if len(parts) < 2:
            raise ArcdeployError(
                f"{p}: directly in {root}; put each identity's images in DIR/<identity>/ or give --labels"
            )
        out.append(parts[0])
    return out


def read_labels(path: str | os.PathLike, count: int) -> list[str]:
    """One identity per line, in input order; exactly ``count`` of them."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArcdeployError(f"{path}: no such labels file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ArcdeployError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None
    labels = [line.strip() for line in text.splitlines()]
    while labels and not labels[-1]:
        labels.pop()
    for i, label in enumerate(labels, 1):
        if not label:
            raise ArcdeployError(f"{path}: line {i} is empty; one identity per line, in input order")
    if len(labels) != count:
        raise ArcdeployError(f"{path}: {len(labels)} labels for {count} inputs; one identity per input, in order")
    return labels


# ------------------------------------------------------------------ the gallery


class Gallery:
    """A gallery store with the model check, normalisation and image embedding around it."""

    def __init__(self, store: GalleryStore):
        self.store = store

    @property
    def location(self) -> str:
        return self.store.location

    def model(self) -> ModelIdentity | None:
        return self.store.model()

    def check_package(self, package) -> tuple[ModelIdentity, dict]:
        """The package's model, refused in one line when it is not the gallery's."""
        model, origin = model_of(package)
        check_model(self.store.model(), model, self.location, origin["package"])
        return model, origin

    def add(
        self, vectors, identities: Sequence[str], package, samples: Sequence[str] | None = None, where: str = "features"
    ) -> AddResult:
        """Enrol feature rows [N, D] of ``package``'s model (a package path, :class:`Package` or
        :class:`ModelIdentity`). Rows that are not finite or all zero (a failed image's) are
        left out and returned as failures."""
        model, origin = self.check_package(package)
        x, ok = unit_rows(vectors, model.dim, where)
        samples = list(samples) if samples is not None else [f"{where}[{i}]" for i in range(len(x))]
        identities = list(identities)
        check_names(identities, samples, len(x), where)
        failures = [
            Failure(i, samples[i], "not a usable embedding (not finite or all zero)")
            for i in np.flatnonzero(~ok).tolist()
        ]
        keep = np.flatnonzero(ok)
        kept_ids = [identities[i] for i in keep]
        self.store.add(x[keep], kept_ids, [samples[i] for i in keep], model, origin)
        return AddResult(len(keep), sorted(set(kept_ids)), failures)

    def add_images(
        self,
        package,
        images: Sequence,
        identities: Sequence[str],
        landmarks=None,
        detector=None,
        root=None,
        samples: Sequence[str] | None = None,
        progress: bool = False,
    ) -> AddResult:
        """Embed image files with ``package`` and enrol each under its identity; images that fail
        are returned as failures, the rest are enrolled."""
        pkg = _package(package)
        self.check_package(pkg)  # before any image is embedded
        paths = list(images)
        if len(identities) != len(paths):
            raise ArcdeployError(f"{len(paths)} images but {len(identities)} identities")
        feats, failures = embed_for_gallery(
            pkg, paths, landmarks=landmarks, detector=detector, root=root, progress=progress
        )
        names = list(samples) if samples is not None else [str(p) for p in paths]
        failed = {f.index for f in failures}
        keep = [i for i in range(len(paths)) if i not in failed]
        res = self.add(feats[keep], [identities[i] for i in keep], pkg, [names[i] for i in keep])
        res.failures = sorted(failures + [_reindex(f, keep) for f in res.failures], key=lambda f: f.index)
        return res

    def search(
        self,
        vectors,
        package,
        top_k: int = DEFAULT_TOP_K,
        threshold: float | None = None,
        queries: Sequence[str] | None = None,
        where: str = "features",
    ) -> tuple[list[SearchResult], list[Failure]]:
        """Per usable query row, the ``top_k`` identities (score: cosine with the identity's best
        sample) at or above ``threshold``; none left means unknown. Unusable rows are failures."""
        if top_k < 1:
            raise ArcdeployError(f"top-k must be at least 1, got {top_k}")
        if threshold is not None and not -1.0 <= threshold <= 1.0:
            raise ArcdeployError(f"threshold must be a cosine between -1 and 1, got {threshold:g}")
        model, _ = self.check_package(package)
        x, ok = unit_rows(vectors, model.dim, where)
        names = list(queries) if queries is not None else [f"{where}[{i}]" for i in range(len(x))]
        if len(names) != len(x):
            raise ArcdeployError(f"{where}: {len(x)} queries but {len(names)} query names")
        keep = np.flatnonzero(ok)
        found = self.store.search(x[keep], int(top_k)) if len(keep) else []
        results = [SearchResult(names[i], apply_threshold(m, threshold)) for i, m in zip(keep.tolist(), found)]
        failures = [
            Failure(i, names[i], "not a usable embedding (not finite or all zero)")
            for i in np.flatnonzero(~ok).tolist()
        ]
        return results, failures

    def search_images(
        self,
        package,
        images: Sequence,
        top_k: int = DEFAULT_TOP_K,
        threshold: float | None = None,
        landmarks=None,
        detector=None,
        root=None,
        queries: Sequence[str] | None = None,
        progress: bool = False,
    ) -> tuple[list[SearchResult], list[Failure]]:
        """Embed image files with ``package`` and search each; images that fail are returned as failures."""
        pkg = _package(package)
        self.check_package(pkg)
        paths = list(images)
        feats, failures = embed_for_gallery(
            pkg, paths, landmarks=landmarks, detector=detector, root=root, progress=progress
        )
        names = list(queries) if queries is not None else [str(p) for p in paths]
        failed = {f.index for f in failures}
        keep = [i for i in range(len(paths)) if i not in failed]
        results, more = self.search(feats[keep], pkg, top_k, threshold, [names[i] for i in keep])
        return results, sorted(failures + [_reindex(f, keep) for f in more], key=lambda f: f.index)

    def remove(self, identity: str) -> int:
        return self.store.remove(identity)

    def info(self) -> GalleryInfo:
        return self.store.info()

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reindex(f: Failure, keep: list[int]) -> Failure:
    return Failure(keep[f.index], f.path, f.reason)


def open_gallery(location: Any, write: bool = False, index: str | None = None) -> Gallery:
    """A gallery: a folder (FAISS + SQLite; made by the first add) or ``postgresql://...``
    (PostgreSQL + pgvector). ``write``: for adding and removing (a second writer is refused
    until this one is closed); ``index``: flat (exact, default), int8 or hnsw, for a new gallery."""
    from .pgvector_store import is_postgres_url

    if is_postgres_url(location):
        from .pgvector_store import PostgresGallery

        return Gallery(PostgresGallery(location, write=write, index=index))
    from .faiss_store import FolderGallery

    return Gallery(FolderGallery(location, write=write, index=index))
