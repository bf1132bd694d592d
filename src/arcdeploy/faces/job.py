"""An embed job: which images, how their faces are found, and how the work is run and kept.

:class:`EmbedJob` is settled once (:meth:`EmbedJob.create` reads a landmark file, resolves
names, checks every setting) and then given, unchanged, to whatever runs it: the local
pipeline (:func:`arcdeploy.faces.pipeline.run_local`), a Ray cluster
(:func:`arcdeploy.distributed.run_on_ray`), or a caller of its own. It is picklable when its
detector is a :class:`DetectorSpec` (an opened detector runs where it was opened only).

Settings
    ``flip``: also the mirrored crop's feature (rows ``[2, D]``); ``raw``: no L2
    normalisation; ``batch``: images per inference call (default: the package's batch, else
    :data:`DEFAULT_BATCH`); ``chunk_rows``: images per saved chunk (rounded up to whole batches;
    default :data:`DEFAULT_CHUNK_ROWS`); ``workers``: decoding/alignment threads (default: the
    CPUs this process may use, one more with a detector, 2 to 8); ``max_pixels``: the largest
    image decoded (default 50 megapixels or ``ARCDEPLOY_MAX_PIXELS``); ``output``: the ``.npy``
    written (atomically, resumably), ``resume`` / ``force`` / ``progress`` as the command line has them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError
from ..machine import check_threads, usable_cpus
from .detectors import DetectorSpec, FaceDetector, as_detector
from .prepare import exclusive_landmarks_detector, resolve_landmarks
from .types import Missing

DEFAULT_BATCH = 32
DEFAULT_CHUNK_ROWS = 2048
MAX_DEFAULT_WORKERS = 8
WORKERS_PER_CPU = 4


def default_batch(package) -> int:
    """Images per inference call when nobody says: the package's compiled batch, else its build
    batch, else :data:`DEFAULT_BATCH`."""
    return int(package.fixed_batch or package.manifest.batch or DEFAULT_BATCH)


class LandmarkTable:
    """Per-image landmarks — None (an aligned crop), [5, 2] points, or :class:`Missing` (the
    landmark file has no row for it) — held as two arrays: one compact object for a job of
    hundreds of thousands of images, cheap to pickle for other processes."""

    NONE, POINTS, MISSING = 0, 1, 2

    def __init__(self, entries: Sequence):
        self.kind = np.zeros(len(entries), np.int8)
        self.points = np.zeros((len(entries), 5, 2), np.float32)
        self.source: str | None = None
        for i, pts in enumerate(entries):
            if isinstance(pts, Missing):
                self.kind[i] = self.MISSING
                self.source = pts.source
            elif pts is not None:
                self.kind[i] = self.POINTS
                self.points[i] = pts

    def __len__(self) -> int:
        return len(self.kind)

    def __getitem__(self, i: int):
        kind = self.kind[i]
        if kind == self.POINTS:
            return self.points[i].copy()
        return Missing(self.source) if kind == self.MISSING else None


def _items(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        return [images]
    return list(images)


def common_root(items: Sequence) -> Path | None:
    """The folder every path in ``items`` lies under (what landmark names are relative to), or
    None for arrays or paths with nothing in common."""
    if not items or any(isinstance(p, np.ndarray) for p in items):
        return None
    try:
        return Path(os.path.commonpath([os.path.dirname(os.fspath(p)) or "." for p in items]))
    except (ValueError, TypeError):  # mixed absolute and relative paths, or inputs that are no paths
        return None


@dataclass(frozen=True)
class EmbedJob:
    """Images to embed and how (module doc). Build one with :meth:`create`."""

    items: list
    landmarks: LandmarkTable | None = None
    detector: DetectorSpec | FaceDetector | None = None
    all_faces: bool = False
    flip: bool = False
    raw: bool = False
    batch: int | None = None
    chunk_rows: int | None = None
    workers: int | None = None
    max_pixels: int | None = None
    output: Path | None = None
    resume: bool = True
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch", "chunk_rows", "workers", "max_pixels"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ArcdeployError(f"{name.replace('_', ' ')} must be at least 1, got {value}")
        # decoding threads wait on files as well as compute: a few per CPU can help, hundreds cannot
        check_threads(self.workers, "workers", per_cpu=WORKERS_PER_CPU)
        if self.all_faces and self.detector is None:
            raise ArcdeployError("all faces: give a face detector to find them")
        exclusive_landmarks_detector(self.landmarks, self.detector, "landmarks", "a detector")
        if self.landmarks is not None and len(self.landmarks) != len(self.items):
            raise ArcdeployError(f"{len(self.landmarks)} landmark entries for {len(self.items)} images")
        if self.output is not None:
            object.__setattr__(self, "output", Path(self.output))

    @classmethod
    def create(
        cls,
        images,
        landmarks=None,
        detector=None,
        root: str | os.PathLike | None = None,
        detector_settings: dict | None = None,
        **settings: Any,
    ) -> EmbedJob:
        """A job for ``images`` (paths, :class:`~arcdeploy.faces.types.EncodedImage`, RGB uint8
        arrays, or one array [N, H, W, 3]).

        ``landmarks``: None (aligned crops, at least 32x32; other sizes are resized to 112x112),
        a landmark file or :class:`~arcdeploy.faces.landmarks.Landmarks` looked up by name
        (relative to ``root``, default the images' common folder), or one [5, 2] entry per image
        (None entries allowed). ``detector``: instead, a detector file (opened with
        ``detector_settings``, see :class:`DetectorSpec`), spec or opened detector. ``settings``:
        the fields of :class:`EmbedJob` (module doc)."""
        items = _items(images)
        exclusive_landmarks_detector(landmarks, detector, "landmarks", "detector")
        if root is None:
            root = common_root(items)
        lmks = resolve_landmarks(items, landmarks, root)
        spec = as_detector(detector, **(detector_settings or {}))
        return cls(items, None if lmks is None else LandmarkTable(lmks), spec, **settings)

    # ---- what the settings come to for one package

    def batch_for(self, package) -> int:
        return int(self.batch or default_batch(package))

    def chunk_rows_for(self, batch: int) -> int:
        """Images per saved chunk: a whole number of batches, so a resumed run cuts the same batches."""
        rows = int(self.chunk_rows or DEFAULT_CHUNK_ROWS)
        return max(batch, -(-rows // batch) * batch)

    def worker_count(self) -> int:
        if self.workers:
            return int(self.workers)
        cpus = usable_cpus()
        # with a detector, one worker more than the cores: each photo's work is a decode, a detector
        # call and numpy between them, and a third worker keeps both cores busy while the other two
        # wait on the GIL or hand over. Measured on 2 cores (benchmarks/bench_photos.py's packages,
        # 3 interleaved rounds): 3 workers against 2, 1.15x on 12 MP photos, 1.07x on LFW-size
        # photos, 1.05x with a 256x256 detector package, 0.99-1.02x on the real photos
        wanted = cpus + 1 if self.detector is not None else cpus
        return min(MAX_DEFAULT_WORKERS, max(2, wanted))

    def row_shape(self, package) -> tuple[int, ...]:
        dim = int(package.output_spec.dim)
        return (2, dim) if self.flip else (dim,)

    def detector_spec(self) -> DetectorSpec | None:
        """The detector as settings that can travel (an opened detector's own spec)."""
        d = self.detector
        if isinstance(d, FaceDetector):
            if d.spec is None:
                raise ArcdeployError(f"{d.describe()}: opened without a spec; open it with open_detector to send it")
            return d.spec
        return d

    def identity(self, package, batch: int, chunk_rows: int, detection=None) -> dict:
        """What the job's saved chunks belong to (see :mod:`arcdeploy.faces.chunks`): the package,
        the images and their landmarks as the file system has them, and every setting that
        changes a row or where a chunk starts."""
        from .chunks import images_identity

        state = {
            "package": package.fingerprint(),
            "images": images_identity(self.items, self.landmarks),
            "count": len(self.items),
            "landmarks": self.landmarks is not None,
            "flip": bool(self.flip),
            "raw": bool(self.raw),
            "batch": int(batch),
            "chunk_rows": int(chunk_rows),
        }
        if detection is not None:  # only then: saved work of landmark jobs stays resumable
            state["detector"] = detection.identity()
            state["all_faces"] = detection.all_faces
        return state
