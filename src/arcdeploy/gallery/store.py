"""What every gallery store does, and the parts they share.

A gallery holds unit-length embeddings, each enrolled under an identity and a sample
name (the image it came from). A search ranks identities by cosine, an identity's score
being the maximum over its samples (as InsightFace Server ranks them).

A gallery records the model its vectors come from (:class:`ModelIdentity`): the
fingerprint of the source the package was built from (the checkpoint or ONNX file,
``manifest.source.sha256``), the input convention and the embedding size. Packages of one
source share an embedding space whatever their engine or precision (fp32, bf16 and int8
packages each pass a fidelity floor against the same fp32 reference), so they may add to
and search one gallery; a package of another model may not.

Stores (:class:`GalleryStore`): :mod:`.faiss_store` (a folder: FAISS + SQLite) and
:mod:`.pgvector_store` (PostgreSQL with pgvector). They receive vectors already checked
and L2-normalised (:func:`unit_rows`).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ArcdeployError

GALLERY_FORMAT_NAME = "arcdeploy-gallery"
GALLERY_FORMAT_VERSION = 1
GALLERY_FORMAT = f"{GALLERY_FORMAT_NAME}/{GALLERY_FORMAT_VERSION}"

INDEX_KINDS = ("flat", "int8", "hnsw")
DEFAULT_TOP_K = 5


# ------------------------------------------------------------------ the model a gallery belongs to


@dataclass(frozen=True)
class ModelIdentity:
    """The embedding space a gallery's vectors live in.

    ``source_sha256``: the checkpoint's or ONNX file's sha256 (every package built from it,
    at any precision, carries the same one); ``input``: colour order and normalisation the
    model was fed with (an override such as ``--bgr`` makes another space from one file);
    ``dim``: the embedding size. ``arch`` is for people to read, not compared.
    """

    source_sha256: str
    dim: int
    input: str
    arch: str = ""

    @classmethod
    def from_manifest(cls, manifest, where: str) -> ModelIdentity:
        """The identity of a package's model (``manifest``: a PackageManifest)."""
        sha = getattr(manifest.source, "sha256", None)
        if not isinstance(sha, str) or not sha:
            raise ArcdeployError(
                f"{where}: the manifest records no source fingerprint (source.sha256), so a gallery cannot "
                "tell which model it is; rebuild the package with this arcdeploy"
            )
        spec = manifest.input
        return cls(source_sha256=sha, dim=int(manifest.output.dim), input=_input_convention(spec), arch=manifest.arch)

    def same_space(self, other: ModelIdentity) -> bool:
        return (self.source_sha256, self.dim, self.input) == (other.source_sha256, other.dim, other.input)

    def describe(self) -> str:
        name = f"{self.arch} " if self.arch else ""
        return f"{name}(source sha256 {self.source_sha256[:12]}, {self.input}, {self.dim}-d)"

    def to_json(self) -> dict:
        return {"source_sha256": self.source_sha256, "dim": self.dim, "input": self.input, "arch": self.arch}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ModelIdentity:
        if not isinstance(data, dict):
            raise ArcdeployError(f"{where}: 'model' is not a JSON object")
        sha, dim, inp, arch = (data.get(k) for k in ("source_sha256", "dim", "input", "arch"))
        if not isinstance(sha, str) or not isinstance(inp, str) or not isinstance(dim, int) or dim < 1:
            raise ArcdeployError(f"{where}: 'model' is damaged (source_sha256, dim, input expected)")
        return cls(source_sha256=sha, dim=dim, input=inp, arch=arch if isinstance(arch, str) else "")


def _input_convention(spec) -> str:
    def fmt(v):
        return "/".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"

    return f"{spec.color} (x - {fmt(spec.mean)}) / {fmt(spec.std)}"


def check_model(gallery_model: ModelIdentity | None, model: ModelIdentity, location: str, package: str) -> None:
    """Refuse, in one line, a package whose embeddings are not comparable with the gallery's."""
    if gallery_model is None or gallery_model.same_space(model):
        return
    raise ArcdeployError(
        f"{package}: another model than the gallery's: {location} holds embeddings of {gallery_model.describe()}, "
        f"this package makes those of {model.describe()}; they are not comparable (use a package built from the "
        "gallery's model, or another gallery)"
    )


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class Match:
    identity: str
    score: float  # cosine: the best of the identity's samples

    def to_json(self) -> dict:
        return {"identity": self.identity, "score": self.score}


@dataclass
class SearchResult:
    query: str
    matches: list[Match]  # best first; empty: unknown (nothing at or above the threshold)

    @property
    def unknown(self) -> bool:
        return not self.matches

    def to_json(self) -> dict:
        return {"query": self.query, "matches": [m.to_json() for m in self.matches]}


@dataclass
class GalleryInfo:
    location: str
    store: str  # "folder (FAISS + SQLite)" | "PostgreSQL + pgvector"
    index: str
    model: ModelIdentity | None
    identities: int
    vectors: int
    adds: list[dict] = field(default_factory=list)  # one per add: time, package, engine, precision, count

    def to_json(self) -> dict:
        return {
            "location": self.location,
            "store": self.store,
            "index": self.index,
            "model": self.model.to_json() if self.model else None,
            "identities": self.identities,
            "vectors": self.vectors,
            "adds": self.adds,
        }


# ------------------------------------------------------------------ the interface


class GalleryStore(abc.ABC):
    """Where a gallery's vectors, identities and samples live.

    ``add`` and ``remove`` change the gallery whole or not at all; a second writer at the
    same time is refused. ``search`` takes unit float32 queries [Q, D] and gives, per query,
    the ``top_k`` identities by their best sample's inner product (= cosine).
    """

    location: str

    @abc.abstractmethod
    def model(self) -> ModelIdentity | None:
        """The model the gallery was made with (None: the gallery is new or was never added to)."""

    @abc.abstractmethod
    def index_kind(self) -> str | None:
        """flat | int8 | hnsw (None: a new gallery)."""

    @abc.abstractmethod
    def add(
        self,
        vectors: np.ndarray,
        identities: Sequence[str],
        samples: Sequence[str],
        model: ModelIdentity,
        origin: dict,
    ) -> None:
        """Enrol unit vectors [N, D]; ``origin``: what made them (package, engine, precision)."""

    @abc.abstractmethod
    def search(self, queries: np.ndarray, top_k: int) -> list[list[Match]]:
        """Per unit query, the best ``top_k`` identities (score = max over the identity's samples)."""

    @abc.abstractmethod
    def remove(self, identity: str) -> int:
        """Remove an identity and its samples; returns how many samples went."""

    @abc.abstractmethod
    def info(self) -> GalleryInfo: ...

    def close(self) -> None:  # noqa: B027 (stores that hold nothing need not close)
        """Release what the store holds (a lock, a connection)."""

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------ shared arithmetic


def unit_rows(vectors: Any, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``vectors`` [N, D] as L2-normalised float32, and a mask of the rows that could be used
    (finite and not all zero: a failed image's NaN row is not enrolled)."""
    x = np.asarray(vectors)
    if x.ndim == 1:
        x = x[None]
    if x.ndim == 3 and x.shape[1] == 2:
        raise ArcdeployError(
            f"{where}: [N, 2, {x.shape[2]}] features (an image and its mirrored crop); a gallery takes "
            f"[N, {x.shape[2]}] (embed without --flip)"
        )
    if x.ndim != 2:
        raise ArcdeployError(f"{where}: expected features [N, D], got shape {list(x.shape)}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ArcdeployError(f"{where}: expected float features, got {x.dtype}")
    if x.shape[1] != dim:
        raise ArcdeployError(f"{where}: {x.shape[1]}-d features, but the model's embeddings are {dim}-d")
    out = np.zeros(x.shape, np.float32)
    ok = np.zeros(len(x), bool)
    for s in range(0, len(x), 65536):  # in blocks: the float64 copy stays small for any N
        block = np.asarray(x[s : s + 65536], dtype=np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(block, axis=1)
        good = np.isfinite(block).all(axis=1) & np.isfinite(norms) & (norms > 1e-12)
        out[s : s + len(block)][good] = (block[good] / norms[good, None]).astype(np.float32)
        ok[s : s + len(block)] = good
    return out, ok


def best_identities(scores: np.ndarray, owners: np.ndarray, names: Mapping[int, str], top_k: int) -> list[Match]:
    """Identities from samples given best first (``scores`` descending, ``owners`` the
    sample's identity number): each identity's first (best) score, ties by name."""
    _, first = np.unique(owners, return_index=True)
    first.sort()
    found = [(float(scores[i]), names[int(owners[i])]) for i in first]
    found.sort(key=lambda t: (-t[0], t[1]))
    return [Match(name, score) for score, name in found[:top_k]]


def distinct_count(owners: np.ndarray) -> int:
    return int(np.unique(owners).size)


def apply_threshold(matches: list[Match], threshold: float | None) -> list[Match]:
    if threshold is None:
        return matches
    return [m for m in matches if m.score >= threshold]


def check_names(identities: Sequence[str], samples: Sequence[str], n: int, where: str) -> None:
    if len(identities) != n or len(samples) != n:
        raise ArcdeployError(f"{where}: {n} vectors but {len(identities)} identities and {len(samples)} sample names")
    for i, name in enumerate(identities):
        if not isinstance(name, str) or not name.strip() or name != name.strip() or "\n" in name:
            raise ArcdeployError(f"{where}: identity {i} is {name!r}; identities are non-empty one-line names")
