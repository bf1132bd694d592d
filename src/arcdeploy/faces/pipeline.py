"""Faces in, embeddings out: a batched, overlapped and resumable embed pipeline.

Each image is prepared (:func:`arcdeploy.faces.prepare.prepare_face`: decoded,
checked, aligned) in a thread pool — OpenCV releases the GIL, so this runs beside
inference — while the engine works on the batch before; a few batches are
prepared ahead (bounded memory). Rows come out in input order.

Output rows
    Row ``i`` is image ``i``: ``[N, D]``, or ``[N, 2, D]`` with ``flip`` (the
    image's feature and that of its horizontally mirrored aligned crop, as the
    IJB protocol needs). Rows are L2-normalised unless ``raw`` (with ``flip``
    each of the two features is normalised on its own; the IJB protocol wants
    ``raw``). An image that cannot be used (missing, empty, corrupt, not an
    image, too large, no landmarks for it, implausible landmarks, or a model
    output that is not finite) gets a row of NaN so rows stay aligned with the
    input; it is listed in the failures.

Writing to a file (``embed_files`` with ``output``)
    An existing output or failures file is not replaced without ``force``; a
    second process writing the same output is refused (a lock beside it); work
    is saved in chunks and resumed (:mod:`arcdeploy.faces.chunks`). Chunk
    boundaries are batch boundaries and batches are fixed runs of the input, so
    a resumed run gives the same bytes as an uninterrupted one.

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

import numpy as np

from ..errors import ArcdeployError
from ..files import FileLock, refuse_existing
from .chunks import ChunkStore, failures_path_for, images_identity, parts_dir_for
from .prepare import MISSING, Failure, input_name, prepare_face, prepare_or_failure, resolve_landmarks

__all__ = ["DEFAULT_BATCH", "DEFAULT_CHUNK_ROWS", "EmbedOptions", "EmbedResult", "Failure", "MISSING",
           "default_batch", "embed_block", "embed_files", "embed_images", "failures_path_for", "job_state",
           "parts_dir_for", "prepare_face", "resolve_landmarks"]

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
    resumed_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures


def default_batch(package) -> int:
    return int(package.fixed_batch or package.manifest.batch or DEFAULT_BATCH)


def package_fingerprint(package) -> str:
    """sha256 over the package's manifest.json and the files it names."""
    return package.fingerprint()


# ---------------------------------------------------------------- the engine loop


def _prepared_batches(items, lmks, batches: list[tuple[int, int]], workers: int, max_pixels: int | None,
                      prefetch: int = PREFETCH_BATCHES):
    """Yield (start, end, crops [k,112,112,3], ok_offsets, failures) for each (start, end)
    in ``batches``, in order, preparing up to ``prefetch`` batches ahead in a thread pool."""
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="arcdeploy-decode")
    pending: deque = deque()
    todo = iter(batches)

    def submit() -> bool:
        nxt = next(todo, None)
        if nxt is None:
            return False
        s, e = nxt
        futs = [pool.submit(prepare_or_failure, items[i], None if lmks is None else lmks[i], i, max_pixels)
                for i in range(s, e)]
        pending.append((s, e, futs))
        return True

    try:
        for _ in range(max(1, prefetch)):
            if not submit():
                break
        while pending:
            s, e, futs = pending.popleft()
            submit()  # keep the queue full while this batch is consumed
            crops, ok, failures = [], [], []
            for off, fut in enumerate(futs):
                res = fut.result()
                if isinstance(res, Failure):
                    failures.append(res)
                else:
                    crops.append(res)
                    ok.append(off)
            arr = np.stack(crops) if crops else np.empty((0, 112, 112, 3), np.uint8)
            yield s, e, arr, np.asarray(ok, np.int64), failures
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


def _embedded_batches(package, items, lmks, batches, workers: int, flip: bool, raw: bool,
                      max_pixels: int | None) -> Iterator[tuple[int, int, np.ndarray, list[Failure]]]:
    """Yield (start, end, rows [end - start, ...] float32, failures) per batch; failed rows are NaN.
    A row the model gives as NaN or infinity is a failure too, not a result."""
    row_shape: tuple[int, ...] | None = None
    for s, e, crops, ok, fails in _prepared_batches(items, lmks, batches, workers, max_pixels):
        feats = _features(package, crops, flip, raw) if len(crops) else None
        if feats is not None:
            if row_shape is None:
                row_shape = tuple(feats.shape[1:])
            elif tuple(feats.shape[1:]) != row_shape:
                raise ArcdeployError(f"engine output changed shape: {list(feats.shape[1:])} vs {list(row_shape)}")
        rows = np.full((e - s, *(row_shape or _row_shape(package, flip))), np.nan, np.float32)
        if feats is not None:
            finite = np.isfinite(feats.reshape(len(feats), -1)).all(axis=1)
            rows[ok[finite]] = feats[finite]
            for off in ok[~finite]:
                fails.append(Failure(s + int(off), input_name(items[s + int(off)], s + int(off)), NON_FINITE))
            fails.sort(key=lambda f: f.index)
        yield s, e, rows, fails


def _progress_bar(total: int, initial: int, enabled: bool, desc: str = "embed"):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc=desc, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


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


def embed_images(package, images, landmarks=None, flip: bool = False, raw: bool = False, batch: int | None = None,
                 workers: int | None = None, on_error: str = "raise", max_pixels: int | None = None) -> np.ndarray:
    """Embeddings of images given as paths or RGB uint8 arrays (aligned crops or loose crops with landmarks).

    ``images``: a sequence of paths / arrays, or one array [N, H, W, 3].
    ``landmarks``: None (images are aligned crops, at least 32x32; other sizes
    are resized to 112x112), a sequence of [5, 2] per image (None entries
    allowed), or a landmark file / :class:`Landmarks` looked up by image path.
    Returns float32 [N, 512] (``flip``: [N, 2, 512]), L2-normalised unless ``raw``.
    ``on_error``: "raise" (default) raises :class:`ArcdeployError` naming the
    bad images; "nan" gives them NaN rows. ``max_pixels``: the largest image
    file decoded (default 50 megapixels or ``ARCDEPLOY_MAX_PIXELS``).
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (str, os.PathLike, np.ndarray)):
        items = [images]
    else:
        items = list(images)
    if on_error not in ("raise", "nan"):
        raise ValueError(f"on_error must be 'raise' or 'nan', not {on_error!r}")
    lmks = resolve_landmarks(items, landmarks)
    batch = _batch_size(package, batch)
    feats, failures = _embed_all(package, items, lmks, batch, flip, raw, _workers(workers), max_pixels, None, None)
    if failures and on_error == "raise":
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ArcdeployError(f"{failures[0]}{more}")
    return feats


def _embed_all(package, items, lmks, batch, flip, raw, workers, max_pixels, bar, on_failure):
    n = len(items)
    batches = [(s, min(s + batch, n)) for s in range(0, n, batch)]
    parts, failures = [], []
    for s, e, rows, fails in _embedded_batches(package, items, lmks, batches, workers, flip, raw, max_pixels):
        parts.append(rows)
        for f in fails:
            failures.append(f)
            if on_failure:
                on_failure(f)
        if bar is not None:
            bar.update(e - s)
    out = np.concatenate(parts) if parts else np.empty((0, *_row_shape(package, flip)), np.float32)
    return out, failures


def _common_root(items) -> Path | None:
    if not items or any(isinstance(p, np.ndarray) for p in items):
        return None
    try:
        return Path(os.path.commonpath([os.path.dirname(os.fspath(p)) or "." for p in items]))
    except ValueError:  # mixed absolute and relative paths: no common root
        return None


def embed_files(package, paths: Sequence, landmarks=None, flip: bool = False, raw: bool = False,
                batch: int | None = None, output: str | os.PathLike | None = None, resume: bool = True,
                progress: bool = True, workers: int | None = None, root: str | os.PathLike | None = None,
                chunk_rows: int | None = None, on_failure: Callable[[Failure], None] | None = None,
                force: bool = False, max_pixels: int | None = None) -> EmbedResult:
    """Embed a list of image files (the CLI's and the IJB evaluator's entry point).

    Bad images do not stop the job: they get NaN rows and are returned in
    ``failures`` (and, with ``output``, listed in ``FEATS.failures.tsv``).
    With ``output`` the features are written there (atomically; an existing
    output or failures file only with ``force``) and the work is resumable
    (module doc); ``features`` is then the written file opened read-only
    (memory-mapped). ``root`` is the folder names in a landmark file are
    relative to (default: the common folder of ``paths``). ``on_failure`` is
    called for each failure as it is found.
    """
    items = list(paths)
    n = len(items)
    if root is None:
        root = _common_root(items)
    lmks = resolve_landmarks(items, landmarks, root)
    batch = _batch_size(package, batch)
    chunk_rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    chunk_rows = max(batch, -(-chunk_rows // batch) * batch)  # a whole number of batches
    workers = _workers(workers)
    _quiet_opencv()

    if output is None:
        bar = _progress_bar(n, 0, progress)
        try:
            feats, failures = _embed_all(package, items, lmks, batch, flip, raw, workers, max_pixels, bar, on_failure)
        finally:
            bar.close()
        return EmbedResult(feats, failures)

    output = Path(output)
    refuse_existing(output, force)
    refuse_existing(failures_path_for(output), force, "use --force to replace it (it lists an earlier run's failures)")
    with FileLock(output):
        # the engine is loaded before any partial work exists: a package that cannot load
        # leaves nothing behind to trip over on the corrected rerun
        if hasattr(package, "runtime"):
            package.runtime  # noqa: B018 (opens the runtime)
        state = job_state(package, items, lmks, flip, raw, batch, chunk_rows)
        store = ChunkStore.open(output, state, resume)
        return _embed_to_store(package, store, items, lmks, output, batch, chunk_rows, flip, raw, workers,
                               max_pixels, progress, on_failure, force)


def _embed_to_store(package, store: ChunkStore, items, lmks, output: Path, batch, chunk_rows, flip, raw, workers,
                    max_pixels, progress, on_failure, force) -> EmbedResult:
    n = len(items)
    n_chunks = -(-n // chunk_rows)
    bounds = [(c * chunk_rows, min((c + 1) * chunk_rows, n)) for c in range(n_chunks)]
    done: dict[int, list[Failure]] = {}
    row_shape: tuple[int, ...] | None = None
    for c, (s, e) in enumerate(bounds):
        loaded = store.load(c, e - s)
        if loaded is not None:
            done[c] = loaded[1]
            row_shape = row_shape or tuple(loaded[0].shape[1:])
    resumed_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
    for c in sorted(done):  # failures of chunks saved before, in order
        for f in done[c]:
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
        for s, e, rows, fails in _embedded_batches(package, items, lmks, batches, workers, flip, raw, max_pixels):
            c = chunk_of[s]
            if c != cur_c:
                cur_c, cur, cur_fail = c, [], []
            cur.append(rows)
            for f in fails:
                cur_fail.append(f)
                if on_failure:
                    on_failure(f)
            bar.update(e - s)
            if e == bounds[c][1]:
                chunk = np.concatenate(cur)
                if row_shape is not None and tuple(chunk.shape[1:]) != row_shape:
                    raise ArcdeployError(f"engine output changed shape: {list(chunk.shape[1:])} vs {list(row_shape)}")
                row_shape = tuple(chunk.shape[1:])
                store.save(c, chunk, cur_fail)
                done[c] = cur_fail
    finally:
        bar.close()

    failures = [f for c in range(n_chunks) for f in done[c]]
    row_shape = row_shape or _row_shape(package, flip)
    fpath = store.assemble(output, bounds, row_shape, failures, force=force)
    store.remove()
    return EmbedResult(np.load(output, mmap_mode="r"), failures, output, fpath, resumed_rows)


# ---------------------------------------------------------------- one block at a time (distributed runs)


@dataclass(frozen=True)
class EmbedOptions:
    """How every image of a job is embedded, settled once: what :func:`embed_block` needs
    besides the images (picklable, so it can travel to other processes and machines)."""

    batch: int
    flip: bool = False
    raw: bool = False
    workers: int = 2
    max_pixels: int | None = None


def job_state(package, items, lmks, flip: bool, raw: bool, batch: int, chunk_rows: int) -> dict:
    """The identity of an embed job that its saved chunks belong to (see :mod:`arcdeploy.faces.chunks`)."""
    return {"package": package.fingerprint(), "images": images_identity(items, lmks), "count": len(items),
            "landmarks": lmks is not None, "flip": bool(flip), "raw": bool(raw), "batch": int(batch),
            "chunk_rows": int(chunk_rows)}


def embed_block(package, items, lmks, start: int, end: int,
                options: EmbedOptions) -> tuple[np.ndarray, list[Failure]]:
    """Rows ``start`` to ``end`` of a job, exactly as :func:`embed_files` computes them.

    ``items[i]`` and ``lmks[i]`` (``lmks`` None: aligned crops) are read for ``start <= i < end``
    only, so a mapping holding just this block's entries will do. Failures carry the job-wide
    index. The block is cut into inference batches from ``start``: with ``start`` a multiple of
    ``options.batch`` (as chunk boundaries are), each batch is the one the local run sends to the
    engine, so the rows are the same.
    """
    batches = [(s, min(s + options.batch, end)) for s in range(start, end, options.batch)]
    parts: list[np.ndarray] = []
    failures: list[Failure] = []
    for _, _, rows, fails in _embedded_batches(package, items, lmks, batches, options.workers, options.flip,
                                               options.raw, options.max_pixels):
        parts.append(rows)
        failures += fails
    if not parts:
        return np.empty((0, *_row_shape(package, options.flip)), np.float32), failures
    return np.concatenate(parts), failures
