"""Faces in, embeddings out: an :class:`~arcdeploy.faces.job.EmbedJob` run on this machine,
batched, overlapped and resumable.

Each image is prepared (:func:`arcdeploy.faces.prepare.prepare_image`: decoded, checked, its
faces found by a detector when the job has one, aligned) in a thread pool — OpenCV and the
detector's engine release the GIL, so this runs beside inference — while the engine works on
the batch before; a few batches are prepared ahead (bounded memory). With a detector whose graph
has a batch axis (a detector package), a worker's task is that many photos, found in one call of
the detector (:func:`arcdeploy.faces.prepare.prepare_detected`). Rows come out in input order.

Output rows
    Row ``i`` is image ``i``: ``[N, D]``, or ``[N, 2, D]`` with ``flip`` (the image's feature
    and that of its horizontally mirrored aligned crop, as the IJB protocol needs). Rows are
    L2-normalised unless ``raw`` (with ``flip`` each of the two features is normalised on its
    own; the IJB protocol wants ``raw``). An image that cannot be used (missing, empty, corrupt,
    not an image, too large, no landmarks for it, implausible landmarks, no face found by the
    detector, or a model output that is not finite) gets a row of NaN so rows stay aligned with
    the input; it is listed in the failures.

    With a detector, an image's row is its best (largest) face. With ``all_faces`` there is one
    row per face found instead, in image order and, within an image, best first;
    :attr:`EmbedResult.faces` (and with an output file ``FEATS.faces.tsv``) says which image and
    box each row is. An image without a face then has no row; it is listed in the failures.

Writing to a file (a job with ``output``)
    An existing output or failures (or faces) file is not replaced without ``force``; a second
    process writing the same output is refused (a lock beside it); work is saved in chunks and
    resumed (:mod:`arcdeploy.faces.chunks`). Chunk boundaries are batch boundaries and batches
    are fixed runs of the input, so a resumed run gives the same bytes as an uninterrupted one.

Landmark lookup by name (a landmark file): see :meth:`arcdeploy.faces.landmarks.Landmarks.find`
— path relative to the images root, then the path as given, then the file name alone when
unambiguous.
"""

from __future__ import annotations

import contextlib
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError
from ..files import FileLock, refuse_existing
from .chunks import ChunkStore, FaceRow, faces_path_for, failures_path_for
from .job import EmbedJob
from .prepare import Detection, as_detection, prepare_detected, prepare_image_or_failure
from .types import Face, Failure, Prepared, input_name

__all__ = [
    "EmbedResult",
    "PreparedBatch",
    "embed_block",
    "embed_files",
    "embed_images",
    "prepare_batches",
    "progress_bar",
    "quiet_opencv",
    "run_local",
]

PREFETCH_BATCHES = 3
NON_FINITE = "the model gave a non-finite embedding"

FailureCallback = Callable[[Failure], None]


@dataclass
class EmbedResult:
    features: np.ndarray
    failures: list[Failure] = field(default_factory=list)
    output: Path | None = None
    failures_path: Path | None = None
    resumed_rows: int = 0  # images whose rows came from saved work
    faces: list[FaceRow] | None = None  # with all_faces: which face each row is
    faces_path: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------- preparing, ahead of the engine


@dataclass
class PreparedBatch:
    """The crops of images ``start`` to ``end``: ``owners`` says each crop's image as an offset
    from ``start``; ``found`` (with a detector) each crop's face and its number."""

    start: int
    end: int
    crops: np.ndarray  # uint8 [k, 112, 112, 3]
    owners: np.ndarray  # int64 [k]
    failures: list[Failure]
    found: list[tuple[Face, int]] | None


def prepare_batches(
    job: EmbedJob,
    batches: Sequence[tuple[int, int]],
    detection: Detection | None = None,
    items=None,
    prefetch: int = PREFETCH_BATCHES,
) -> Iterator[PreparedBatch]:
    """Each (start, end) of ``batches``, prepared, in order; up to ``prefetch`` batches are
    prepared ahead in ``job.worker_count()`` threads. ``items``: where input ``i`` is read from
    (default ``job.items``; a mapping holding only some indices will do)."""
    items = job.items if items is None else items
    lmks = job.landmarks
    workers = job.worker_count()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="arcdeploy-decode")
    pending: deque = deque()
    todo = iter(batches)

    # with a detector, a task is a few images (the detector's batch: found in one network call);
    # otherwise one image
    per_task = max(1, int(getattr(detection.detector, "batch", 1))) if detection is not None else 1

    def prepare_some(start: int, end: int) -> list[Prepared | Failure]:
        if detection is None:
            return [
                prepare_image_or_failure(items[i], None if lmks is None else lmks[i], i, job.max_pixels)
                for i in range(start, end)
            ]
        return prepare_detected([(items[i], i) for i in range(start, end)], detection, job.max_pixels)

    def submit() -> bool:
        nxt = next(todo, None)
        if nxt is None:
            return False
        s, e = nxt
        # tasks of at most per_task photos, as even as can be and at least one per worker
        tasks = min(e - s, max(-(-(e - s) // per_task), workers))
        cuts = [s + (e - s) * k // tasks for k in range(tasks + 1)]
        futs = [pool.submit(prepare_some, a, b) for a, b in zip(cuts, cuts[1:])]
        pending.append((s, e, futs))
        return True

    try:
        for _ in range(max(1, prefetch)):
            if not submit():
                break
        while pending:
            s, e, futs = pending.popleft()
            submit()  # keep the queue full while this batch is consumed
            yield _gather(s, e, futs, detection is not None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _gather(start: int, end: int, futures, detected: bool) -> PreparedBatch:
    crops, owners, failures = [], [], []
    found: list[tuple[Face, int]] = []
    results = [res for fut in futures for res in fut.result()]
    for off, res in enumerate(results):
        if isinstance(res, Failure):
            failures.append(res)
            continue
        crops.append(res.crops)
        owners.extend([off] * len(res.crops))
        if res.faces is not None:
            found.extend(zip(res.faces, res.face_numbers or []))
    arr = np.concatenate(crops) if crops else np.empty((0, 112, 112, 3), np.uint8)
    return PreparedBatch(start, end, arr, np.asarray(owners, np.int64), failures, found if detected else None)


# ---------------------------------------------------------------- the engine loop


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a non-finite row stays non-finite and becomes a failure
        return x / np.maximum(n, np.float32(1e-12))


def features_of(package, crops: np.ndarray, flip: bool, raw: bool) -> np.ndarray:
    """Embeddings of aligned crops as a job's rows: with ``flip`` [k, 2, D] (the crop and its
    mirror image), L2-normalised unless ``raw``."""
    feats = np.asarray(package.infer(crops), dtype=np.float32)
    if flip:
        mirrored = np.ascontiguousarray(crops[:, :, ::-1])
        feats = np.stack([feats, np.asarray(package.infer(mirrored), dtype=np.float32)], axis=1)
    return feats if raw else _normalise(feats).astype(np.float32, copy=False)


@dataclass
class _Batch:
    start: int
    end: int
    rows: np.ndarray  # per image [end - start, ...]; with all_faces per face found
    failures: list[Failure]
    faces: list[FaceRow] | None = None  # with all_faces: which face each row is


def _embedded_batches(package, job: EmbedJob, batches, detection: Detection | None, items=None) -> Iterator[_Batch]:
    """Yield the rows of each batch; failed rows are NaN (with all_faces: left out). A row
    the model gives as NaN or infinity is a failure too, not a result."""
    items = job.items if items is None else items
    all_faces = detection is not None and detection.all_faces
    row_shape: tuple[int, ...] | None = None
    for pb in prepare_batches(job, batches, detection, items):
        feats = features_of(package, pb.crops, job.flip, job.raw) if len(pb.crops) else None
        if feats is not None:
            if row_shape is None:
                row_shape = tuple(feats.shape[1:])
            elif tuple(feats.shape[1:]) != row_shape:
                raise ArcdeployError(f"engine output changed shape: {list(feats.shape[1:])} vs {list(row_shape)}")
        shape = row_shape or job.row_shape(package)
        finite = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1) if feats is not None else np.zeros(0, bool)
        fails = pb.failures
        if all_faces:
            rows = feats[finite] if feats is not None else np.empty((0, *shape), np.float32)
            index = []
            for j, (off, (face, number)) in enumerate(zip(pb.owners, pb.found or [])):
                i = pb.start + int(off)
                if finite[j]:
                    x1, y1, x2, y2 = (float(v) for v in face.box)
                    index.append(FaceRow(i, input_name(items[i], i), int(number), (x1, y1, x2, y2), float(face.score)))
                else:
                    fails.append(Failure(i, input_name(items[i], i), f"face {number}: {NON_FINITE}"))
            fails.sort(key=lambda f: f.index)
            yield _Batch(pb.start, pb.end, rows, fails, index)
            continue
        rows = np.full((pb.end - pb.start, *shape), np.nan, np.float32)
        if feats is not None:
            rows[pb.owners[finite]] = feats[finite]
            for off in pb.owners[~finite]:
                i = pb.start + int(off)
                fails.append(Failure(i, input_name(items[i], i), NON_FINITE))
            fails.sort(key=lambda f: f.index)
        yield _Batch(pb.start, pb.end, rows, fails)


def progress_bar(total: int, initial: int, enabled: bool, desc: str = "embed"):
    """A tqdm bar on stderr, shown only on a terminal."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="img",
        desc=desc,
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not (enabled and sys.stderr.isatty()),
    )


def quiet_opencv() -> None:
    """OpenCV's own decoder warnings off: the pipeline reports failures itself, one line each."""
    with contextlib.suppress(Exception):
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


# ---------------------------------------------------------------- running a job here


def run_local(job: EmbedJob, package, on_failure: FailureCallback | None = None) -> EmbedResult:
    """Run ``job`` with ``package`` on this machine (module doc); ``on_failure`` is called for
    each failure as it is found. With ``job.output`` the features are written there and
    ``features`` is the written file opened read-only (memory-mapped)."""
    if job.output is not None:  # before opening anything: the images may take hours
        refuse_outputs(job.output, job.force, job.all_faces)
    detection = as_detection(job.detector, job.all_faces)
    batch = job.batch_for(package)
    quiet_opencv()
    if job.output is None:
        n = len(job.items)
        batches = [(s, min(s + batch, n)) for s in range(0, n, batch)]
        bar = progress_bar(n, 0, job.progress)
        try:
            return _collect_all(package, job, batches, detection, bar, on_failure)
        finally:
            bar.close()
    chunk_rows = job.chunk_rows_for(batch)
    with FileLock(job.output):
        # the engine is loaded before any partial work exists: a package that cannot load
        # leaves nothing behind to trip over on the corrected rerun
        if hasattr(package, "runtime"):
            package.runtime  # noqa: B018 (opens the runtime)
        store = ChunkStore.open(job.output, job.identity(package, batch, chunk_rows, detection), job.resume)
        return _run_into_store(package, job, store, batch, chunk_rows, detection, on_failure)


def _collect_all(package, job: EmbedJob, batches, detection, bar, on_failure) -> EmbedResult:
    parts, failures = [], []
    faces: list[FaceRow] | None = [] if detection is not None and detection.all_faces else None
    for b in _embedded_batches(package, job, batches, detection):
        parts.append(b.rows)
        if faces is not None:
            faces.extend(b.faces or [])
        for f in b.failures:
            failures.append(f)
            if on_failure:
                on_failure(f)
        if bar is not None:
            bar.update(b.end - b.start)
    out = np.concatenate(parts) if parts else np.empty((0, *job.row_shape(package)), np.float32)
    return EmbedResult(out, failures, faces=faces)


def refuse_outputs(output: Path, force: bool, all_faces: bool) -> None:
    """An existing output, failures or faces file is refused unless ``force``."""
    refuse_existing(output, force)
    refuse_existing(failures_path_for(output), force, "use --force to replace it (it lists an earlier run's failures)")
    if all_faces:
        refuse_existing(faces_path_for(output), force, "use --force to replace it (it indexes an earlier run's rows)")


@dataclass
class _Done:
    """A chunk saved whole: its failures, its number of rows and (all faces) its row index."""

    failures: list[Failure]
    rows: int
    faces: list[FaceRow] | None


def _load_saved(store: ChunkStore, bounds, all_faces: bool) -> tuple[dict[int, _Done], tuple[int, ...] | None]:
    done: dict[int, _Done] = {}
    row_shape: tuple[int, ...] | None = None
    for c, (s, e) in enumerate(bounds):
        # with all faces a chunk has as many rows as its row index says
        loaded = store.load(c, None if all_faces else e - s)
        if loaded is not None:
            done[c] = _Done(loaded.failures, len(loaded.features), loaded.faces)
            row_shape = row_shape or tuple(loaded.features.shape[1:])
    return done, row_shape


def _run_into_store(
    package, job: EmbedJob, store: ChunkStore, batch: int, chunk_rows: int, detection, on_failure
) -> EmbedResult:
    n = len(job.items)
    output = Path(job.output or "")
    all_faces = detection is not None and detection.all_faces
    n_chunks = -(-n // chunk_rows)
    bounds = [(c * chunk_rows, min((c + 1) * chunk_rows, n)) for c in range(n_chunks)]  # images per chunk
    done, row_shape = _load_saved(store, bounds, all_faces)
    resumed_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
    for c in sorted(done):  # failures of chunks saved before, in order
        for f in done[c].failures:
            if on_failure:
                on_failure(f)

    bar = progress_bar(n, resumed_rows, job.progress)
    try:
        todo = [c for c in range(n_chunks) if c not in done]
        # one pipeline across all missing chunks, so decoding never stalls at a chunk boundary
        batches = [(s, min(s + batch, bounds[c][1])) for c in todo for s in range(bounds[c][0], bounds[c][1], batch)]
        chunk_of = {b: c for c in todo for b in range(bounds[c][0], bounds[c][1], batch)}
        pending = _ChunkBuffer()
        for b in _embedded_batches(package, job, batches, detection):
            c = chunk_of[b.start]
            pending.add(c, b, on_failure)
            bar.update(b.end - b.start)
            if b.end == bounds[c][1]:
                chunk = np.concatenate(pending.rows)
                if row_shape is not None and tuple(chunk.shape[1:]) != row_shape:
                    raise ArcdeployError(f"engine output changed shape: {list(chunk.shape[1:])} vs {list(row_shape)}")
                row_shape = tuple(chunk.shape[1:])
                index = pending.faces if all_faces else None
                store.save(c, chunk, pending.failures, index)
                done[c] = _Done(pending.failures, len(chunk), index)
    finally:
        bar.close()

    failures = [f for c in range(n_chunks) for f in done[c].failures]
    faces = [fr for c in range(n_chunks) for fr in (done[c].faces or [])] if all_faces else None
    row_bounds, r = [], 0
    for c in range(n_chunks):  # each chunk's rows in the output
        row_bounds.append((r, r + done[c].rows))
        r += done[c].rows
    fpath = store.assemble(
        output, row_bounds, row_shape or job.row_shape(package), failures, force=job.force, faces=faces
    )
    store.remove()
    faces_path = faces_path_for(output) if all_faces else None
    return EmbedResult(np.load(output, mmap_mode="r"), failures, output, fpath, resumed_rows, faces, faces_path)


class _ChunkBuffer:
    """The batches of the chunk being filled."""

    def __init__(self) -> None:
        self.chunk: int | None = None
        self.rows: list[np.ndarray] = []
        self.failures: list[Failure] = []
        self.faces: list[FaceRow] = []

    def add(self, chunk: int, b: _Batch, on_failure) -> None:
        if chunk != self.chunk:
            self.chunk, self.rows, self.failures, self.faces = chunk, [], [], []
        self.rows.append(b.rows)
        self.faces.extend(b.faces or [])
        for f in b.failures:
            self.failures.append(f)
            if on_failure:
                on_failure(f)


# ---------------------------------------------------------------- one block at a time (distributed runs)


def embed_block(
    package, job: EmbedJob, start: int, end: int, detection: Detection | None = None, items=None
) -> tuple[np.ndarray, list[Failure]]:
    """Rows ``start`` to ``end`` of ``job``, exactly as :func:`run_local` computes them.

    ``items`` (default ``job.items``): where input ``i`` is read from, for
    ``start <= i < end`` only, so a mapping holding just this block's entries will do. Failures
    carry the job-wide index. The block is cut into inference batches from ``start``: with
    ``start`` a multiple of the batch (as chunk boundaries are), each batch is the one the local
    run sends to the engine, so the rows are the same. ``detection``: the job's detector, opened
    where the block runs (the best face of each image: one row per image).
    """
    if detection is not None and detection.all_faces:
        raise ArcdeployError("one row per face (--all-faces) is not available for block-wise (distributed) runs")
    batch = job.batch_for(package)
    batches = [(s, min(s + batch, end)) for s in range(start, end, batch)]
    parts: list[np.ndarray] = []
    failures: list[Failure] = []
    for b in _embedded_batches(package, job, batches, detection, items):
        parts.append(b.rows)
        failures += b.failures
    if not parts:
        return np.empty((0, *job.row_shape(package)), np.float32), failures
    return np.concatenate(parts), failures


# ---------------------------------------------------------------- conveniences over EmbedJob


def embed_files(package, paths: Sequence, on_failure: FailureCallback | None = None, **settings) -> EmbedResult:
    """Embed image files: :func:`run_local` of ``EmbedJob.create(paths, **settings)`` (see
    :class:`~arcdeploy.faces.job.EmbedJob` for the settings: landmarks or detector, flip, raw,
    batch, output, ...). Bad images do not stop the job: they get NaN rows and are returned in
    ``failures`` (and, with ``output``, listed in ``FEATS.failures.tsv``)."""
    return run_local(EmbedJob.create(paths, **settings), package, on_failure)


def embed_images(package, images, on_error: str = "raise", **settings) -> np.ndarray:
    """Embeddings of images given as paths or RGB uint8 arrays (aligned crops, loose crops with
    landmarks, or photos with a face detector): float32 [N, 512] (``flip``: [N, 2, 512]),
    L2-normalised unless ``raw``; ``settings`` as :meth:`EmbedJob.create` takes them.

    ``on_error``: "raise" (default) raises :class:`ArcdeployError` naming the bad images (an
    image without a face is one); "nan" gives them NaN rows. A detector file is opened with one
    engine thread per call: the preparation workers share it."""
    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error must be 'raise' or 'nan', not {on_error!r}")
    settings.setdefault("progress", False)
    res = run_local(EmbedJob.create(images, **settings), package)
    if res.failures and on_error == "raise":
        more = f" (and {len(res.failures) - 1} more)" if len(res.failures) > 1 else ""
        raise ArcdeployError(f"{res.failures[0]}{more}")
    return res.features
