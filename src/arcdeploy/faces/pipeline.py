"""Faces in, embeddings out: a batched, overlapped and resumable embed pipeline.

Each image is decoded (OpenCV), checked and aligned in a thread pool — OpenCV
releases the GIL, so this runs beside inference — while the engine works on
the batch before; a few batches are prepared ahead (bounded memory). Rows come
out in input order.

Output rows
    Row ``i`` is image ``i``: ``[N, D]``, or ``[N, 2, D]`` with ``flip`` (the
    image's feature and that of its horizontally mirrored aligned crop, as the
    IJB protocol needs). Rows are L2-normalised unless ``raw`` (with ``flip``
    each of the two features is normalised on its own; the IJB protocol wants
    ``raw``). An image that cannot be used (missing, empty, corrupt, not an
    image, no landmarks for it, landmarks off the image) gets a row of NaN so
    rows stay aligned with the input; it is listed in the failures.

Resuming (``embed_files`` with ``output``)
    Work is saved as it goes in ``OUTPUT.parts/`` beside the output: one
    ``chunk_NNNNNN.npy`` (+ ``.json`` with its failures) per ``chunk_rows``
    images, and ``state.json`` naming the package (hash of its manifest and
    model files), the image list (hash of paths and landmarks), flip, raw,
    batch and chunk size. Running the same job again continues after the last
    saved chunk; a ``.parts`` folder from a job with other settings is refused
    (``resume=False`` discards it). Chunk boundaries are batch boundaries and
    batches are fixed runs of the input, so a resumed run gives the same bytes
    as an uninterrupted one. The output (and ``OUTPUT-stem.failures.tsv``:
    index, path, reason) are written atomically; the parts folder is removed
    after success.

Landmark lookup by name (a landmark file): see
:meth:`arcdeploy.faces.landmarks.Landmarks.find` — path relative to the images
root, then the path as given, then the file name alone when unambiguous.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import ArcdeployError
from ..files import write_json_atomic
from .align import landmarks_problem, to_aligned
from .io import ImageError, read_image
from .landmarks import Landmarks, read_landmarks

STATE_FORMAT = "arcdeploy-embed-parts/1"
DEFAULT_BATCH = 32
DEFAULT_CHUNK_ROWS = 2048
PREFETCH_BATCHES = 3
KILL_ENV = "ARCDEPLOY_TEST_KILL_AFTER_CHUNKS"  # tests: SIGKILL self after k chunks are saved


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()  # a landmark file was given but has no row for this image


@dataclass
class Failure:
    index: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


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


def failures_path_for(output: str | os.PathLike) -> Path:
    """``FEATS.npy`` -> ``FEATS.failures.tsv`` (same folder)."""
    output = Path(output)
    stem = output.name[:-4] if output.name.endswith(".npy") else output.name
    return output.with_name(f"{stem}.failures.tsv")


def parts_dir_for(output: str | os.PathLike) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".parts")


def default_batch(package) -> int:
    return int(package.fixed_batch or package.manifest.batch or DEFAULT_BATCH)


# ---------------------------------------------------------------- inputs


def _name(item, index: int) -> str:
    return str(item) if not isinstance(item, np.ndarray) else f"<array {index}>"


def _as_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ImageError(name, f"expected a uint8 RGB array, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(name, f"expected an H x W x 3 RGB array, got shape {list(arr.shape)}")
    return arr


def resolve_landmarks(items: Sequence, landmarks, root=None, source: str | None = None) -> list | None:
    """Per-image landmarks: None (images are aligned crops) or a list with, per
    image, float32 [5, 2], None (this one is an aligned crop) or MISSING.

    ``landmarks``: None; a landmark file path or :class:`Landmarks` (looked up
    by name, see :meth:`Landmarks.find`); or a sequence / array [N, 5, 2] with
    one entry per image (None entries allowed).
    """
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = read_landmarks(landmarks)
    if isinstance(landmarks, Landmarks):
        out = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                raise ArcdeployError(f"image {i} is an array: landmarks by name need file paths "
                                     "(pass one [5, 2] array per image instead)")
            pts = landmarks.find(item, root)
            out.append(MISSING if pts is None else pts)
        return out
    if len(landmarks) != len(items):
        raise ArcdeployError(f"{len(landmarks)} landmark entries for {len(items)} images")
    out = []
    for i, pts in enumerate(landmarks):
        if pts is None:
            out.append(None)
            continue
        pts = np.asarray(pts, dtype=np.float32)
        if pts.size != 10:
            raise ArcdeployError(f"landmarks of image {i}: expected 5 points [5, 2], got shape {list(pts.shape)}")
        out.append(pts.reshape(5, 2))
    return out


def prepare_face(item, lmk=None, index: int = 0) -> np.ndarray:
    """One input (path or RGB array) -> its aligned uint8 [112, 112, 3] crop; raises ImageError."""
    name = _name(item, index)
    if lmk is MISSING:
        raise ImageError(name, "no landmarks for this image in the landmark file")
    img = _as_rgb(item, name) if isinstance(item, np.ndarray) else read_image(item)
    if lmk is not None:
        problem = landmarks_problem(lmk, img.shape)
        if problem:
            raise ImageError(name, problem)
    try:
        return to_aligned(img, lmk)
    except ArcdeployError as exc:
        raise ImageError(name, str(exc)) from None


def _prepare_safe(item, lmk, index):
    try:
        return prepare_face(item, lmk, index)
    except ImageError as exc:
        return Failure(index, exc.path, exc.reason)
    except Exception as exc:  # an OpenCV or OS surprise on one image must not stop the job
        return Failure(index, _name(item, index), f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}")


# ---------------------------------------------------------------- the engine loop


def _prepared_batches(items, lmks, batches: list[tuple[int, int]], workers: int, prefetch: int = PREFETCH_BATCHES):
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
        futs = [pool.submit(_prepare_safe, items[i], None if lmks is None else lmks[i], i) for i in range(s, e)]
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
            yield s, e, arr, ok, failures
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _normalise(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
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


def _fill(out: np.ndarray, base: int, s: int, e: int, crops, ok, feats) -> None:
    out[s - base:e - base] = np.nan
    if len(ok):
        out[np.asarray(ok) + (s - base)] = feats


def _run_rows(package, items, lmks, start: int, end: int, batch: int, flip: bool, raw: bool, workers: int,
              progress, on_failure) -> tuple[np.ndarray, list[Failure]]:
    batches = [(s, min(s + batch, end)) for s in range(start, end, batch)]
    out = None
    failures: list[Failure] = []
    for s, e, crops, ok, fails in _prepared_batches(items, lmks, batches, workers):
        feats = _features(package, crops, flip, raw) if len(crops) else None
        if out is None:
            shape = feats.shape[1:] if feats is not None else _row_shape(package, flip)
            out = np.empty((end - start, *shape), np.float32)
        if feats is not None and feats.shape[1:] != out.shape[1:]:
            raise ArcdeployError(f"engine output changed shape: {list(feats.shape[1:])} vs {list(out.shape[1:])}")
        _fill(out, start, s, e, crops, ok, feats)
        for f in fails:
            failures.append(f)
            if on_failure:
                on_failure(f)
        if progress is not None:
            progress.update(e - s)
    if out is None:
        out = np.empty((0, *_row_shape(package, flip)), np.float32)
    return out, failures


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


# ---------------------------------------------------------------- public API


def embed_images(package, images, landmarks=None, flip: bool = False, raw: bool = False, batch: int | None = None,
                 workers: int | None = None, on_error: str = "raise") -> np.ndarray:
    """Embeddings of images given as paths or RGB uint8 arrays (aligned crops or loose crops with landmarks).

    ``images``: a sequence of paths / arrays, or one array [N, H, W, 3].
    ``landmarks``: None (images are aligned crops; other sizes are resized to
    112x112), a sequence of [5, 2] per image (None entries allowed), or a
    landmark file / :class:`Landmarks` looked up by image path.
    Returns float32 [N, 512] (``flip``: [N, 2, 512]), L2-normalised unless ``raw``.
    ``on_error``: "raise" (default) raises :class:`ArcdeployError` naming the
    bad images; "nan" gives them NaN rows.
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
    batch = int(batch or default_batch(package))
    if batch < 1:
        raise ArcdeployError(f"batch must be at least 1, got {batch}")
    feats, failures = _run_rows(package, items, lmks, 0, len(items), batch, flip, raw, _workers(workers), None, None)
    if failures and on_error == "raise":
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ArcdeployError(f"{failures[0]}{more}")
    return feats


def _sha256_update_items(h, items, lmks) -> None:
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            h.update(b"A")
            h.update(str(item.shape).encode())
            h.update(np.ascontiguousarray(item).tobytes())
        else:
            h.update(b"P")
            h.update(os.fsencode(os.path.abspath(item)))  # the same files from another working folder
        h.update(b"\0")
        lmk = None if lmks is None else lmks[i]
        if lmk is None:
            h.update(b"-")
        elif lmk is MISSING:
            h.update(b"?")
        else:
            h.update(np.ascontiguousarray(lmk, dtype=np.float32).tobytes())
        h.update(b"\n")


def package_fingerprint(package) -> str:
    """sha256 over the package's manifest.json and the files it names."""
    return package.fingerprint()


def _write_failures_tsv(path: Path, failures: list[Failure]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("index\tpath\treason\n")
            for fl in failures:
                clean = [str(x).replace("\t", " ").replace("\n", " ") for x in (fl.index, fl.path, fl.reason)]
                f.write("\t".join(clean) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _save_chunk(parts: Path, c: int, feats: np.ndarray, failures: list[Failure]) -> None:
    from ..files import save_npy_atomic

    # failures first: the .npy is what marks the chunk as done
    write_json_atomic(parts / f"chunk_{c:06d}.json", [[f.index, f.path, f.reason] for f in failures])
    save_npy_atomic(parts / f"chunk_{c:06d}.npy", feats)


def _load_chunk(parts: Path, c: int, rows: int) -> tuple[np.ndarray, list[Failure]] | None:
    npy, js = parts / f"chunk_{c:06d}.npy", parts / f"chunk_{c:06d}.json"
    if not npy.exists() or not js.exists():
        return None
    try:
        feats = np.load(npy, mmap_mode="r")
        fails = [Failure(int(i), str(p), str(r)) for i, p, r in json.loads(js.read_text())]
    except (OSError, ValueError, TypeError):
        return None
    if feats.shape[0] != rows or feats.dtype != np.float32:
        return None
    return feats, fails


def embed_files(package, paths: Sequence, landmarks=None, flip: bool = False, raw: bool = False,
                batch: int | None = None, output: str | os.PathLike | None = None, resume: bool = True,
                progress: bool = True, workers: int | None = None, root: str | os.PathLike | None = None,
                chunk_rows: int | None = None, on_failure: Callable[[Failure], None] | None = None) -> EmbedResult:
    """Embed a list of image files (the CLI's and the IJB evaluator's entry point).

    Bad images do not stop the job: they get NaN rows and are returned in
    ``failures`` (and, with ``output``, listed in ``FEATS.failures.tsv``).
    With ``output`` the features are written there (atomically) and the work
    is resumable (module doc); ``features`` is then the written file opened
    read-only (memory-mapped). ``root`` is the folder names in a landmark
    file are relative to (default: the common folder of ``paths``).
    ``on_failure`` is called for each failure as it is found.
    """
    items = list(paths)
    n = len(items)
    if root is None and n and not any(isinstance(p, np.ndarray) for p in items):
        with contextlib.suppress(ValueError):  # mixed absolute and relative paths: no common root
            root = Path(os.path.commonpath([os.path.dirname(os.fspath(p)) or "." for p in items]))
    lmks = resolve_landmarks(items, landmarks, root)
    batch = int(batch or default_batch(package))
    if batch < 1:
        raise ArcdeployError(f"batch must be at least 1, got {batch}")
    chunk_rows = int(chunk_rows or DEFAULT_CHUNK_ROWS)
    chunk_rows = max(batch, -(-chunk_rows // batch) * batch)  # a whole number of batches
    workers = _workers(workers)
    _quiet_opencv()

    if output is None:
        bar = _progress_bar(n, 0, progress)
        try:
            feats, failures = _run_rows(package, items, lmks, 0, n, batch, flip, raw, workers, bar, on_failure)
        finally:
            bar.close()
        return EmbedResult(feats, failures)

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    parts = parts_dir_for(output)
    h = hashlib.sha256()
    _sha256_update_items(h, items, lmks)
    state = {
        "format": STATE_FORMAT,
        "package": package.fingerprint(),
        "images": h.hexdigest(),
        "count": n,
        "landmarks": lmks is not None,
        "flip": bool(flip),
        "raw": bool(raw),
        "batch": batch,
        "chunk_rows": chunk_rows,
    }
    if parts.exists() and not resume:
        shutil.rmtree(parts)
    if parts.exists():
        try:
            old = json.loads((parts / "state.json").read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise ArcdeployError(f"{parts}: a parts folder without a readable state.json; "
                                 "remove it or run again without resuming (--restart)")
        diff = [k for k in state if old.get(k) != state[k]]
        if diff:
            what = ", ".join(f"{k} {old.get(k)!r} -> {state[k]!r}" if k not in ("package", "images") else f"{k} differs"
                             for k in diff)
            raise ArcdeployError(f"{parts}: partial results of a different job ({what}); "
                                 "remove it or run again without resuming (--restart)")
    else:
        parts.mkdir(parents=True)
        write_json_atomic(parts / "state.json", state)

    n_chunks = -(-n // chunk_rows)
    bounds = [(c * chunk_rows, min((c + 1) * chunk_rows, n)) for c in range(n_chunks)]
    done: dict[int, list[Failure]] = {}
    for c, (s, e) in enumerate(bounds):
        loaded = _load_chunk(parts, c, e - s)
        if loaded is not None:
            done[c] = loaded[1]
    resumed_rows = sum(bounds[c][1] - bounds[c][0] for c in done)
    kill_after = int(os.environ.get(KILL_ENV) or 0)
    saved_here = 0

    failures: list[Failure] = []
    bar = _progress_bar(n, resumed_rows, progress)
    try:
        todo = [c for c in range(n_chunks) if c not in done]
        # one pipeline across all missing chunks, so decoding never stalls at a chunk boundary
        batches = [(s, min(s + batch, bounds[c][1])) for c in todo for s in range(bounds[c][0], bounds[c][1], batch)]
        chunk_of = {b: c for c in todo for b in range(bounds[c][0], bounds[c][1], batch)}
        cur_c, cur, cur_fail = None, None, []
        gen = _prepared_batches(items, lmks, batches, workers)
        for c in range(n_chunks):  # failures of chunks saved before, in order
            if c in done:
                for f in done[c]:
                    if on_failure:
                        on_failure(f)
        for s, e, crops, ok, fails in gen:
            c = chunk_of[s]
            if c != cur_c:
                cur_c, cur, cur_fail = c, None, []
            feats = _features(package, crops, flip, raw) if len(crops) else None
            if cur is None:
                shape = feats.shape[1:] if feats is not None else _row_shape(package, flip)
                cur = np.empty((bounds[c][1] - bounds[c][0], *shape), np.float32)
            _fill(cur, bounds[c][0], s, e, crops, ok, feats)
            for f in fails:
                cur_fail.append(f)
                if on_failure:
                    on_failure(f)
            bar.update(e - s)
            if e == bounds[c][1]:
                _save_chunk(parts, c, cur, cur_fail)
                done[c] = cur_fail
                saved_here += 1
                if kill_after and saved_here >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
        gen.close()
    finally:
        bar.close()

    # assemble: stream the chunks into a memory-mapped temp file, then rename
    first = np.load(parts / f"chunk_{0:06d}.npy", mmap_mode="r") if n else None
    row_shape = tuple(first.shape[1:]) if first is not None else _row_shape(package, flip)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".npy", dir=output.parent)
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, *row_shape))
        for c, (s, e) in enumerate(bounds):
            chunk = np.load(parts / f"chunk_{c:06d}.npy", mmap_mode="r")
            if tuple(chunk.shape[1:]) != row_shape:
                raise ArcdeployError(f"{parts}: chunk {c} has rows of shape {list(chunk.shape[1:])}, expected {list(row_shape)}")
            out[s:e] = chunk
            failures.extend(done[c])
        out.flush()
        del out
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the usual mode
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fpath = failures_path_for(output)
    if failures:
        _write_failures_tsv(fpath, failures)
    else:
        with contextlib.suppress(FileNotFoundError):
            fpath.unlink()
    shutil.rmtree(parts, ignore_errors=True)
    return EmbedResult(np.load(output, mmap_mode="r"), failures, output, fpath if failures else None, resumed_rows)
