"""Faces in, embeddings out: a batched, overlapped and resumable embed pipeline.

Each image is prepared (:func:`arcdeploy.faces.prepare.prepare_image`: decoded,
checked, its faces found by a detector when one is given, aligned) in a thread
pool — OpenCV and the detector's engine release the GIL, so this runs beside
inference — while the engine works on the batch before; a few batches are
prepared ahead (bounded memory). Rows come out in input order.

Output rows
    Row ``i`` is image ``i``: ``[N, D]``, or ``[N, 2, D]`` with ``flip`` (the
    image's feature and that of its horizontally mirrored aligned crop, as the
    IJB protocol needs). Rows are L2-normalised unless ``raw`` (with ``flip``
    each of the two features is normalised on its own; the IJB protocol wants
    ``raw``). An image that cannot be used (missing, empty, corrupt, not an
    image, too large, no landmarks for it, implausible landmarks, no face found
    by the detector, or a model output that is not finite) gets a row of NaN so
    rows stay aligned with the input; it is listed in the failures.

    With a detector, an image's row is its best (largest) face. With
    ``all_faces`` there is one row per face found instead, in image order and,
    within an image, best first; :attr:`EmbedResult.faces` (and with an output
    file ``FEATS.faces.tsv``) says which image and box each row is. An image
    without a face then has no row; it is listed in the failures.

Writing to a file (``embed_files`` with ``output``)
    An existing output or failures (or faces) file is not replaced without
    ``force``; a second process writing the same output is refused (a lock
    beside it); work is saved in chunks and resumed (:mod:`arcdeploy.faces.chunks`).
    Chunk boundaries are batch boundaries and batches are fixed runs of the
    input, so a resumed run gives the same bytes as an uninterrupted one.

Landmark lookup by name (a landmark file): see
:meth:`arcdeploy.faces.landmarks.Landmarks.find` — path relative to the images
root, then the path as given, then the file name alone when unambiguous.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ArcdeployError
from ..files import FileLock, refuse_existing
from .chunks import ChunkStore, FaceRow, faces_path_for, failures_path_for, images_identity, parts_dir_for
from .prepare import (
    MISSING,
    Detection,
    Failure,
    as_detection,
    exclusive_landmarks_detector,
    input_name,
    prepare_face,
    prepare_image_or_failure,
    resolve_landmarks,
)

if TYPE_CHECKING:
    from .detect import Face

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_CHUNK_ROWS",
    "EmbedOptions",
    "EmbedResult",
    "FaceRow",
    "Failure",
    "MISSING",
    "default_batch",
    "embed_block",
    "embed_files",
    "embed_images",
    "faces_path_for",
    "failures_path_for",
    "job_state",
    "parts_dir_for",
    "prepare_face",
    "resolve_landmarks",
]

DEFAULT_BATCH = 32
DEFAULT_CHUNK_ROWS = 2048
PREFETCH_BATCHES = 3
NON_FINITE = "the model gave a non-finite embedding"


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


def default_batch(package) -> int:
    return int(package.fixed_batch or package.manifest.batch or DEFAULT_BATCH)


def package_fingerprint(package) -> str:
    """sha256 over the package's manifest.json and the files it names."""
    return package.fingerprint()


# ---------------------------------------------------------------- the engine loop


def _prepared_batches(
    items,
    lmks,
    batches: list[tuple[int, int]],
    workers: int,
    max_pixels: int | None,
    prefetch: int = PREFETCH_BATCHES,
    detection: Detection | None = None,
):
    """Yield (start, end, crops [k,112,112,3], owners, failures, found) for each (start, end)
    in ``batches``, in order, preparing up to ``prefetch`` batches ahead in a thread pool.
    ``owners``: each crop's image as an offset from ``start``; ``found``: with a detector, each
    crop's (face, face number), else None."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="arcdeploy-decode")
    pending: deque = deque()
    todo = iter(batches)

    def submit() -> bool:
        nxt = next(todo, None)
        if nxt is None:
            return False
        s, e = nxt
        futs = [
            pool.submit(prepare_image_or_failure, items[i], None if lmks is None else lmks[i], i, max_pixels, detection)
            for i in range(s, e)
        ]
        pending.append((s, e, futs))
        return True

    try:
        for _ in range(max(1, prefetch)):
            if not submit():
                break
        while pending:
            s, e, futs = pending.popleft()
            submit()  # keep the queue full while this batch is consumed
            crops, owners, failures = [], [], []
            found: list[tuple[Face, int]] = []
            for off, fut in enumerate(futs):
                res = fut.result()
                if isinstance(res, Failure):
                    failures.append(res)
                    continue
                crops.append(res.crops)
                owners.extend([off] * len(res.crops))
                if res.faces is not None:
                    found.extend(zip(res.faces, res.face_numbers or []))
            arr = np.concatenate(crops) if crops else np.empty((0, 112, 112, 3), np.uint8)
            yield s, e, arr, np.asarray(owners, np.int64), failures, (found if detection is not None else None)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a non-finite row stays non-finite and becomes a failure
        return x / np.maximum(n, np.float32(1e-12))


def _features(package, crops: np.ndarray, flip: bool, raw: bool) -> np.ndarray:
    feats = np.asarray(package.infer(crops), dtype=np.float32)
    if flip:
        mirrored = np.ascontiguousarray(crops[:, :, ::-1])
        feats = np.stack([feats, np.asarray(package.infer(mirrored), dtype=np.float32)], axis=1)
    return feats if raw else _normalise(feats).astype(np.float32, copy=False)


def _row_shape(package, flip: bool) -> tuple[int, ...]:
    dim = int(package.output_spec.dim)
    return (2, dim) if flip else (dim,)


@dataclass
class _Batch:
    start: int
    end: int
    rows: np.ndarray  # per image [end - start, ...]; with all_faces per face found
    failures: list[Failure]
    faces: list[FaceRow] | None = None  # with all_faces: which face each row is


def _embedded_batches(
    package,
    items,
    lmks,
    batches,
    workers: int,
    flip: bool,
    raw: bool,
    max_pixels: int | None,
    detection: Detection | None = None,
) -> Iterator[_Batch]:
    """Yield the rows of each batch; failed rows are NaN (with all_faces: left out). A row
    the model gives as NaN or infinity is a failure too, not a result."""
    all_faces = detection is not None and detection.all_faces
    row_shape: tuple[int, ...] | None = None
    for s, e, crops, owners, fails, found in _prepared_batches(
        items, lmks, batches, workers, max_pixels, detection=detection
    ):
        feats = _features(package, crops, flip, raw) if len(crops) else None
        if feats is not None:
            if row_shape is None:
                row_shape = tuple(feats.shape[1:])
            elif tuple(feats.shape[1:]) != row_shape:
                raise ArcdeployError(f"engine output changed shape: {list(feats.shape[1:])} vs {list(row_shape)}")
        shape = row_shape or _row_shape(package, flip)
        finite = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1) if feats is not None else np.zeros(0, bool)
        if all_faces:
            rows = feats[finite] if feats is not None else np.empty((0, *shape), np.float32)
            index = []
            for j, (off, (face, number)) in enumerate(zip(owners, found or [])):
                i = s + int(off)
                if finite[j]:
                    x1, y1, x2, y2 = (float(v) for v in face.box)
                    index.append(FaceRow(i, input_name(items[i], i), int(number), (x1, y1, x2, y2), float(face.score)))
                else:
                    fails.append(Failure(i, input_name(items[i], i), f"face {number}: {NON_FINITE}"))
            fails.sort(key=lambda f: f.index)
            yield _Batch(s, e, rows, fails, index)
            continue
        rows = np.full((e - s, *shape), np.nan, np.float32)
        if feats is not None:
            rows[owners[finite]] = feats[finite]
            for off in owners[~finite]:
                fails.append(Failure(s + int(off), input_name(items[s + int(off)], s + int(off)), NON_FINITE))
            fails.sort(key=lambda f: f.index)
        yield _Batch(s, e, rows, fails)


def _progress_bar(total: int, initial: int, enabled: bool, desc: str = "embed"):
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


def _quiet_opencv() -> None:
    # failures are reported by the pipeline itself, one line each; OpenCV's own
    # decoder warnings would only repeat them
    with contextlib.suppress(Exception):
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)


def _workers(workers: int | None) -> int:
    return int(workers) if workers else min(8, max(2, os.cpu_count() or 2))


def _batch_size(package, batch: int | None) -> int:
    batch = int(batch or default_batch(package))
    if batch < 1:
        raise ArcdeployError(f"batch must be at least 1, got {batch}")
    return batch


# ---------------------------------------------------------------- public API


def _items(images) -> list:
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return list(images)
    if isinstance(images, (str, os.PathLike, np.ndarray)):
        return [images]
    return list(images)


def embed_images(
    package,
    images,
    landmarks=None,
    flip: bool = False,
    raw: bool = False,
    batch: int | None = None,
    workers: int | None = None,
    on_error: str = "raise",
    max_pixels: int | None = None,
    detector=None,
) -> np.ndarray:
    """Embeddings of images given as paths or RGB uint8 arrays (aligned crops, loose crops with
    landmarks, or photos with a face detector).

    ``images``: a sequence of paths / arrays, or one array [N, H, W, 3].
    ``landmarks``: None (images are aligned crops, at least 32x32; other sizes
    are resized to 112x112), a sequence of [5, 2] per image (None entries
    allowed), or a landmark file / :class:`Landmarks` looked up by image path.
    ``detector``: instead of landmarks, a face detector file (SCRFD or YuNet) or an
    opened :class:`arcdeploy.faces.detect.FaceDetector`: each image's best (largest)
    face is embedded (one row per face: :func:`embed_files` with ``all_faces``). The
    preparation workers share the detector, so open your own with few threads per call
    (``open_detector(path, threads=1)``, what a file is opened with).
    Returns float32 [N, 512] (``flip``: [N, 2, 512]), L2-normalised unless ``raw``.
    ``on_error``: "raise" (default) raises :class:`ArcdeployError` naming the
    bad images (an image without a face is one); "nan" gives them NaN rows.
    ``max_pixels``: the largest image file decoded (default 50 megapixels or
    ``ARCDEPLOY_MAX_PIXELS``).
    """
    items = _items(images)
    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error must be 'raise' or 'nan', not {on_error!r}")
    exclusive_landmarks_detector(landmarks, detector, "landmarks", "detector")
    lmks = resolve_landmarks(items, landmarks)
    detection = as_detection(detector)
    batch = _batch_size(package, batch)
    feats, failures, _ = _embed_all(
        package, items, lmks, batch, flip, raw, _workers(workers), max_pixels, None, None, detection
    )
    if failures and on_error == "raise":
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ArcdeployError(f"{failures[0]}{more}")
    return feats


def _embed_all(
    package, items, lmks, batch, flip, raw, workers, max_pixels, bar, on_failure, detection: Detection | None = None
) -> tuple[np.ndarray, list[Failure], list[FaceRow] | None]:
    n = len(items)
    batches = [(s, min(s + batch, n)) for s in range(0, n, batch)]
    parts, failures = [], []
    faces: list[FaceRow] | None = [] if detection is not None and detection.all_faces else None
    for b in _embedded_batches(package, items, lmks, batches, workers, flip, raw, max_pixels, detection):
        parts.append(b.rows)
        if faces is not None:
            faces.extend(b.faces or [])
        for f in b.failures:
            failures.append(f)
            if on_failure:
                on_failure(f)
        if bar is not None:
            bar.update(b.end - b.start)
    out = np.concatenate(parts) if parts else np.empty((0, *_row_shape(package, flip)), np.float32)
    return out, failures, faces


def _common_root(items) -> Path | None:
    if not items or any(isinstance(p, np.ndarray) for p in items):
        return None
    try:
        return Path(os.path.commonpath([os.path.dirname(os.fspath(p)) or "." for p in items]))
    except ValueError:  # mixed absolute and relative paths: no common root
        return None


def embed_files(
    package,
    paths: Sequence,
    landmarks=None,
    flip: bool = False,
    raw: bool = False,
    batch: int | None = None,
    output: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    workers: int | None = None,
    root: str | os.PathLike | None = None,
    chunk_rows: int | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    force: bool = False,
    max_pixels: int | None = None,
    detector=None,
    all_faces: bool = False,
) -> EmbedResult:
    """Embed a list of image files (the CLI's and the IJB evaluator's entry point).

    Bad images do not stop the job: they get NaN rows and are returned in
    ``failures`` (and, with ``output``, listed in ``FEATS.failures.tsv``).
    With ``output`` the features are written there (atomically; an existing
    output or failures file only with ``force``) and the work is resumable
    (module doc); ``features`` is then the written file opened read-only
    (memory-mapped). ``root`` is the folder names in a landmark file are
    relative to (default: the common folder of ``paths``). ``on_failure`` is
    called for each failure as it is found.

    ``detector`` (instead of ``landmarks``): a face detector file or an opened
    detector (see :func:`embed_images`); each image's best face is embedded, or
    with ``all_faces`` every face found: one row per face, ``faces`` saying which
    (and, with ``output``, ``FEATS.faces.tsv``); an image without a face has no row.
    """
    items = list(paths)
    n = len(items)
    if root is None:
        root = _common_root(items)
    exclusive_landmarks_detector(landmarks, detector, "landmarks", "detector")
    if output is not None:  # before opening anything: the images may take hours
        _refuse_outputs(Path(output), force, all_faces)
    lmks = resolve_landmarks(items, landmarks, root)
    detection = as_detection(detector, all_faces)
    batch = _batch_size(package, batch)
    chunk_rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    chunk_rows = max(batch, -(-chunk_rows // batch) * batch)  # a whole number of batches
    workers = _workers(workers)
    _quiet_opencv()

    if output is None:
        bar = _progress_bar(n, 0, progress)
        try:
            feats, failures, faces = _embed_all(
                package, items, lmks, batch, flip, raw, workers, max_pixels, bar, on_failure, detection
            )
        finally:
            bar.close()
        return EmbedResult(feats, failures, faces=faces)

    output = Path(output)
    with FileLock(output):
        # the engine is loaded before any partial work exists: a package that cannot load
        # leaves nothing behind to trip over on the corrected rerun
        if hasattr(package, "runtime"):
            package.runtime  # noqa: B018 (opens the runtime)
        state = job_state(package, items, lmks, flip, raw, batch, chunk_rows, detection)
        store = ChunkStore.open(output, state, resume)
        return _embed_to_store(
            package,
            store,
            items,
            lmks,
            output,
            batch,
            chunk_rows,
            flip,
            raw,
            workers,
            max_pixels,
            progress,
            on_failure,
            force,
            detection,
        )


def _refuse_outputs(output: Path, force: bool, all_faces: bool) -> None:
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


def _embed_to_store(
    package,
    store: ChunkStore,
    items,
    lmks,
    output: Path,
    batch,
    chunk_rows,
    flip,
    raw,
    workers,
    max_pixels,
    progress,
    on_failure,
    force,
    detection: Detection | None = None,
) -> EmbedResult:
    n = len(items)
    all_faces = detection is not None and detection.all_faces
    n_chunks = -(-n // chunk_rows)
    bounds = [(c * chunk_rows, min((c + 1) * chunk_rows, n)) for c in range(n_chunks)]  # images per chunk
    done: dict[int, _Done] = {}
    row_shape: tuple[int, ...] | None = None
    for c, (s, e) in enumerate(bounds):
        # with all faces a chunk has as many rows as its row index says
        loaded = store.load(c, None if all_faces else e - s)
        if loaded is not None:
            done[c] = _Done(loaded.failures, len(loaded.features), loaded.faces)
            row_shape = row_shape or tuple(loaded.features.shape[1:])
    resumed_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
    for c in sorted(done):  # failures of chunks saved before, in order
        for f in done[c].failures:
            if on_failure:
                on_failure(f)

    bar = _progress_bar(n, resumed_rows, progress)
    try:
        todo = [c for c in range(n_chunks) if c not in done]
        # one pipeline across all missing chunks, so decoding never stalls at a chunk boundary
        batches = [(s, min(s + batch, bounds[c][1])) for c in todo for s in range(bounds[c][0], bounds[c][1], batch)]
        chunk_of = {b: c for c in todo for b in range(bounds[c][0], bounds[c][1], batch)}
        cur_c: int | None = None
        cur: list[np.ndarray] = []
        cur_fail: list[Failure] = []
        cur_faces: list[FaceRow] = []
        for b in _embedded_batches(package, items, lmks, batches, workers, flip, raw, max_pixels, detection):
            c = chunk_of[b.start]
            if c != cur_c:
                cur_c, cur, cur_fail, cur_faces = c, [], [], []
            cur.append(b.rows)
            cur_faces.extend(b.faces or [])
            for f in b.failures:
                cur_fail.append(f)
                if on_failure:
                    on_failure(f)
            bar.update(b.end - b.start)
            if b.end == bounds[c][1]:
                chunk = np.concatenate(cur)
                if row_shape is not None and tuple(chunk.shape[1:]) != row_shape:
                    raise ArcdeployError(f"engine output changed shape: {list(chunk.shape[1:])} vs {list(row_shape)}")
                row_shape = tuple(chunk.shape[1:])
                store.save(c, chunk, cur_fail, cur_faces if all_faces else None)
                done[c] = _Done(cur_fail, len(chunk), cur_faces if all_faces else None)
    finally:
        bar.close()

    failures = [f for c in range(n_chunks) for f in done[c].failures]
    faces = [fr for c in range(n_chunks) for fr in (done[c].faces or [])] if all_faces else None
    row_bounds, r = [], 0
    for c in range(n_chunks):  # each chunk's rows in the output
        row_bounds.append((r, r + done[c].rows))
        r += done[c].rows
    row_shape = row_shape or _row_shape(package, flip)
    fpath = store.assemble(output, row_bounds, row_shape, failures, force=force, faces=faces)
    store.remove()
    return EmbedResult(
        np.load(output, mmap_mode="r"),
        failures,
        output,
        fpath,
        resumed_rows,
        faces,
        faces_path_for(output) if all_faces else None,
    )


# ---------------------------------------------------------------- one block at a time (distributed runs)


@dataclass(frozen=True)
class EmbedOptions:
    """How every image of a job is embedded, settled once: what :func:`embed_block` needs
    besides the images (picklable, so it can travel to other processes and machines; a detector
    travels as its file and is opened where the block runs)."""

    batch: int
    flip: bool = False
    raw: bool = False
    workers: int = 2
    max_pixels: int | None = None


def job_state(
    package, items, lmks, flip: bool, raw: bool, batch: int, chunk_rows: int, detection: Detection | None = None
) -> dict:
    """The identity of an embed job that its saved chunks belong to (see :mod:`arcdeploy.faces.chunks`)."""
    state = {
        "package": package.fingerprint(),
        "images": images_identity(items, lmks),
        "count": len(items),
        "landmarks": lmks is not None,
        "flip": bool(flip),
        "raw": bool(raw),
        "batch": int(batch),
        "chunk_rows": int(chunk_rows),
    }
    if detection is not None:  # only then: saved work of landmark jobs stays resumable
        state["detector"] = detection.identity()
        state["all_faces"] = detection.all_faces
    return state


def embed_block(
    package, items, lmks, start: int, end: int, options: EmbedOptions, detection: Detection | None = None
) -> tuple[np.ndarray, list[Failure]]:
    """Rows ``start`` to ``end`` of a job, exactly as :func:`embed_files` computes them.

    ``items[i]`` and ``lmks[i]`` (``lmks`` None: aligned crops) are read for ``start <= i < end``
    only, so a mapping holding just this block's entries will do. Failures carry the job-wide
    index. The block is cut into inference batches from ``start``: with ``start`` a multiple of
    ``options.batch`` (as chunk boundaries are), each batch is the one the local run sends to the
    engine, so the rows are the same. ``detection``: faces found by a detector (the best face of
    each image: one row per image).
    """
    if detection is not None and detection.all_faces:
        raise ArcdeployError("one row per face (--all-faces) is not available for block-wise (distributed) runs")
    batches = [(s, min(s + options.batch, end)) for s in range(start, end, options.batch)]
    parts: list[np.ndarray] = []
    failures: list[Failure] = []
    for b in _embedded_batches(
        package, items, lmks, batches, options.workers, options.flip, options.raw, options.max_pixels, detection
    ):
        parts.append(b.rows)
        failures += b.failures
    if not parts:
        return np.empty((0, *_row_shape(package, options.flip)), np.float32), failures
    return np.concatenate(parts), failures
