"""The embedded gallery: one folder, a FAISS index and an SQLite file of identities and samples.

Layout::

    GALLERY/gallery.json            what the gallery is: model, index, counts, and for each file
                                    below its name, size and sha256 (the commit point)
    GALLERY/index-000007.faiss      the FAISS index (row i = the i-th sample in sequence order)
    GALLERY/samples-000007.sqlite   identities, samples (identity, name), adds (which package)
    GALLERY/vectors-000007.npy      int8 galleries only: the exact float32 vectors the 8-bit
                                    index is encoded from (on disk, not loaded for searching)

Indexes: ``flat`` (exact inner product, ``IndexFlatIP``), ``int8`` (8-bit scalar quantizer,
``IndexScalarQuantizer`` QT_8bit: a quarter of the memory; its per-dimension ranges are the
vectors' own, re-fitted on every change from the exact vectors), ``hnsw`` (``IndexHNSWFlat``,
M=32: approximate, for large galleries; a removal rebuilds the graph).

Writes never touch the files of the gallery as it is: a change writes the next generation's
files beside them, fsyncs them, and then replaces ``gallery.json`` atomically; only then are the
previous files removed. A killed ``add`` leaves the previous gallery whole (its half-written
files are removed by the next writer). A second writer is refused by a lock
(:class:`arcdeploy.files.FileLock`). Every file is checked against the size and sha256 that
``gallery.json`` records before it is read, so a damaged file is a one-line error, never a
wrong answer. Readers take no lock; a reader that meets a generation being replaced reads again.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import shutil
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError, first_line
from ..files import FileLock, clean_stale, disk_error, remove_path, write_json_atomic
from ..manifest import check_format, read_json
from ..utils import sha256_file
from .store import (
    GALLERY_FORMAT,
    GALLERY_FORMAT_NAME,
    GALLERY_FORMAT_VERSION,
    INDEX_KINDS,
    GalleryInfo,
    GalleryStore,
    Match,
    ModelIdentity,
    best_identities,
    check_model,
    distinct_count,
)

log = logging.getLogger(__name__)

META_NAME = "gallery.json"
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64
# int8 ranges are never narrower than this many standard deviations of a random unit vector's
# component (1/sqrt(D)): a gallery of a few vectors would otherwise get a range of almost zero
INT8_MIN_RANGE_SIGMAS = 4.0
FIRST_CANDIDATES = 64  # samples fetched per query before growing (x4) until top_k identities are seen
RETRIES = 3  # a reader that meets a generation being replaced reads gallery.json again

_FILE_NAME = re.compile(r"^(index-\d{6}\.faiss|samples-\d{6}\.sqlite|vectors-\d{6}\.npy)$")
_OUR_LITTER = re.compile(r"^(index-\d{6}\.faiss|samples-\d{6}\.sqlite(-journal|-wal|-shm)?|vectors-\d{6}\.npy)$")

SCHEMA = """
CREATE TABLE identities (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE adds (id INTEGER PRIMARY KEY, time TEXT NOT NULL, package TEXT NOT NULL, engine TEXT,
                   precision TEXT, count INTEGER NOT NULL);
CREATE TABLE samples (seq INTEGER PRIMARY KEY, identity_id INTEGER NOT NULL REFERENCES identities(id),
                      name TEXT NOT NULL, add_id INTEGER NOT NULL REFERENCES adds(id));
CREATE INDEX samples_identity ON samples(identity_id);
"""


# Batches of queries against a flat index: FAISS 1.15 scans the vectors once per query below
# 128000 queries (memory-bound: 3x numpy's matmul for 100 queries at 10^5 vectors here), and its
# matrix-product path works in blocks of 1024 vectors (many small products, slower still). From
# 20 queries on, products in blocks of 65536 vectors measured faster than numpy's one big matmul
# (benchmarks/bench_gallery.py); the block of scores is at most 512 x 65536 floats (128 MiB). Fewer
# queries go through numpy (FolderGallery._index_search).
BLAS_MIN_QUERIES = 20
BLAS_DATABASE_BLOCK = 65536
BLAS_QUERY_BLOCK = 512
_tuned = False


def faiss_module():
    global _tuned
    try:
        import faiss
    except ImportError:
        raise ArcdeployError(
            "a folder gallery needs FAISS, which is not installed: pip install 'arcdeploy[gallery]' (faiss-cpu)"
        ) from None
    if not _tuned:  # process-wide settings of FAISS's exhaustive search (see above)
        faiss.cvar.distance_compute_blas_threshold = BLAS_MIN_QUERIES
        faiss.cvar.distance_compute_blas_database_bs = BLAS_DATABASE_BLOCK
        faiss.cvar.distance_compute_blas_query_bs = BLAS_QUERY_BLOCK
        _tuned = True
    return faiss


@dataclass
class _Loaded:
    """A gallery generation opened for searching: the index and each row's identity number in
    memory; identity names stay in the (checked, read-only) SQLite file and are read for the
    identities a search returns, so a gallery of a million one-photo identities costs no more
    memory than its index."""

    index: Any
    owners: np.ndarray  # int32 [ntotal]: identities.id of each row
    db: sqlite3.Connection
    lock: threading.Lock = field(default_factory=threading.Lock)

    def names(self, ids: Iterable[int]) -> dict[int, str]:
        wanted = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        with self.lock:
            for s in range(0, len(wanted), 900):  # SQLite's limit on bound parameters
                chunk = wanted[s : s + 900]
                marks = ",".join("?" * len(chunk))
                out.update(self.db.execute(f"SELECT id, name FROM identities WHERE id IN ({marks})", chunk))
        return out

    def number_of(self, identity: str) -> int | None:
        with self.lock:
            row = self.db.execute("SELECT id FROM identities WHERE name = ?", (identity,)).fetchone()
        return int(row[0]) if row else None

    def close(self) -> None:
        self.db.close()


class _HashingFile:
    """Writes to a file while hashing what goes through."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        data = bytes(data)
        self.f.write(data)
        self.sha.update(data)
        self.size += len(data)
        return len(data)

    def finish(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"name": self.path.name, "size": self.size, "sha256": self.sha.hexdigest()}


def _file_record(path: Path) -> dict:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


class FolderGallery(GalleryStore):
    """A gallery in a folder (see the module doc). ``write``: take the writer's lock (held until
    :meth:`close`); ``index``: the index kind a new gallery gets (an existing one keeps its own)."""

    def __init__(self, path: str | os.PathLike, write: bool = False, index: str | None = None):
        self.location = str(path)
        self.path = Path(path)
        self.writable = write
        if index is not None and index not in INDEX_KINDS:
            raise ArcdeployError(f"--index {index}: choose one of {', '.join(INDEX_KINDS)}")
        self._faiss = faiss_module()
        self._lock: FileLock | None = None
        self._loaded: _Loaded | None = None
        if write:
            if self.path.exists() and not self.path.is_dir():
                raise ArcdeployError(f"{self.location}: not a folder; a gallery is a folder (or postgresql://...)")
            self._lock = FileLock(self.path.resolve(), "written").acquire()
        try:
            self._state = self._read_state()
            current = self._state["index"]["kind"] if self._state else None
            if index is not None and current is not None and index != current:
                raise ArcdeployError(
                    f"{self.location}: the gallery's index is {current}; --index {index} can only be chosen when "
                    "a gallery is made"
                )
            self._new_index = index or "flat"
            if write:
                self._clean_litter()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ reading

    def _read_state(self) -> dict | None:
        meta = self.path / META_NAME
        if not self.path.exists():
            if self.writable:
                return None
            raise ArcdeployError(f"{self.location}: no such gallery")
        if not self.path.is_dir():
            raise ArcdeployError(f"{self.location}: not a gallery folder")
        if not meta.exists():
            if not self.writable:
                raise ArcdeployError(f"{self.location}: not a gallery (no {META_NAME})")
            others = [e.name for e in self.path.iterdir() if not _OUR_LITTER.match(e.name) and e.name[0] != "."]
            if others:
                raise ArcdeployError(
                    f"{self.location}: a folder that holds other files ({others[0]}, ...) and no {META_NAME}; "
                    "a gallery is made in a new or empty folder"
                )
            return None
        data = read_json(meta)
        where = str(meta)
        if not isinstance(data, dict) or not isinstance(data.get("format"), str):
            raise ArcdeployError(f"{where}: not a gallery description (no 'format')")
        check_format(
            data["format"], GALLERY_FORMAT_NAME, GALLERY_FORMAT_VERSION, where, "a gallery", "make the gallery"
        )
        try:
            gen = data["generation"]
            files = data["files"]
            kind = data["index"]["kind"]
            count = data["count"]
            ok = (
                isinstance(gen, int)
                and isinstance(count, int)
                and kind in INDEX_KINDS
                and isinstance(files, dict)
                and all(
                    isinstance(f, dict)
                    and isinstance(f.get("name"), str)
                    and _FILE_NAME.match(f["name"])
                    and isinstance(f.get("size"), int)
                    and isinstance(f.get("sha256"), str)
                    for f in files.values()
                )
                and "index" in files
                and "samples" in files
                and (kind != "int8" or "vectors" in files)
            )
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise ArcdeployError(f"{where}: damaged (its generation, index, files or count are missing or malformed)")
        ModelIdentity.from_json(data.get("model"), where)
        return data

    def _checked(self, key: str) -> Path:
        """A file of the current generation, after its size and sha256 matched gallery.json."""
        assert self._state is not None
        rec = self._state["files"][key]
        path = self.path / rec["name"]
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise _Missing(path) from None
        if size != rec["size"]:
            raise _damaged(path, f"{size} bytes, gallery.json says {rec['size']}")
        try:
            digest = sha256_file(path)
        except FileNotFoundError:
            raise _Missing(path) from None
        except OSError as exc:
            raise ArcdeployError(f"{path}: unreadable ({exc.strerror or exc})") from None
        if digest != rec["sha256"]:
            raise _damaged(path, "its checksum does not match gallery.json")
        return path

    def _retrying(self, fn):
        """Run a read of the current generation; when a writer replaced it meanwhile, read again."""
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except _Missing as exc:
                gen = self._state["generation"] if self._state else None
                self._state = self._read_state()
                now = self._state["generation"] if self._state else None
                if self.writable or now == gen or attempt == RETRIES:
                    raise ArcdeployError(
                        f"{exc.path}: missing (named by {META_NAME}); the gallery is damaged"
                    ) from None
        raise AssertionError("unreachable")

    def _open_db(self) -> sqlite3.Connection:
        path = self._checked("samples")
        # immutable: a generation's file never changes once gallery.json names it
        uri = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro&immutable=1"
        try:
            con = sqlite3.connect(uri, uri=True, check_same_thread=False)  # used under _Loaded.lock
            con.execute("SELECT count(*) FROM samples").fetchone()
        except sqlite3.Error as exc:
            if not path.exists():  # replaced by a writer since it was checked
                raise _Missing(path) from None
            raise _damaged(path, f"not a readable SQLite file ({first_line(exc)})") from None
        return con

    def _load(self) -> _Loaded | None:
        if self._loaded is not None or self._state is None:
            return self._loaded
        self._loaded = self._retrying(self._load_generation)
        return self._loaded

    def _load_generation(self) -> _Loaded:
        assert self._state is not None
        state = self._state
        con = self._open_db()
        dbpath = self.path / state["files"]["samples"]["name"]
        try:
            try:
                owners = np.fromiter(
                    (r[0] for r in con.execute("SELECT identity_id FROM samples ORDER BY seq")), dtype=np.int64
                )
                orphans = con.execute(
                    "SELECT count(*) FROM samples WHERE identity_id NOT IN (SELECT id FROM identities)"
                ).fetchone()[0]
            except sqlite3.Error as exc:
                raise _damaged(dbpath, first_line(exc)) from None
            if orphans:
                raise _damaged(dbpath, f"{orphans} samples of no identity")
            if len(owners) and owners.max() >= 2**31:
                raise _damaged(dbpath, "identity numbers out of range")
            ipath = self._checked("index")
            try:
                index = self._faiss.read_index(str(ipath))
            except RuntimeError as exc:
                if not ipath.exists():  # replaced by a writer since it was checked
                    raise _Missing(ipath) from None
                raise _damaged(ipath, f"FAISS cannot read it ({first_line(exc)})") from None
            dim = state["model"]["dim"]
            if index.ntotal != len(owners) or index.ntotal != state["count"] or index.d != dim:
                raise _damaged(
                    ipath,
                    f"{index.ntotal} vectors of {index.d}-d, but {len(owners)} samples and {state['count']} "
                    f"{dim}-d vectors recorded",
                )
        except BaseException:
            con.close()
            raise
        return _Loaded(index, owners.astype(np.int32), con)

    # ------------------------------------------------------------------ the interface

    def model(self) -> ModelIdentity | None:
        return ModelIdentity.from_json(self._state["model"], str(self.path / META_NAME)) if self._state else None

    def index_kind(self) -> str | None:
        return self._state["index"]["kind"] if self._state else None

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Match]]:
        loaded = self._load()
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if loaded is None or loaded.index.ntotal == 0:
            return [[] for _ in range(len(q))]
        n = int(loaded.index.ntotal)
        hnsw = self.index_kind() == "hnsw"
        found: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(q)  # per query: scores, owners
        todo = np.arange(len(q))
        m = min(n, max(4 * top_k, FIRST_CANDIDATES))
        while len(todo):
            scores, rows = self._index_search(loaded.index, q[todo], m, hnsw)
            again = []
            for j, qi in enumerate(todo):
                valid = rows[j] >= 0
                owners = loaded.owners[rows[j][valid]]
                # the first top_k distinct identities among samples in score order are the top_k by
                # their best sample; with fewer distinct ones, look further (unless all were seen)
                if m >= n or distinct_count(owners) >= top_k:
                    found[qi] = (scores[j][valid], owners)
                else:
                    again.append(qi)
            todo = np.asarray(again, dtype=np.int64)
            m = min(n, m * 4)
        names = loaded.names(np.concatenate([f[1] for f in found if f is not None]))
        return [best_identities(f[0], f[1], names, top_k) if f is not None else [] for f in found]

    def _index_search(self, index, q: np.ndarray, m: int, hnsw: bool):
        faiss = self._faiss
        params = faiss.SearchParametersHNSW(efSearch=max(HNSW_EF_SEARCH, m)) if hnsw else None
        if len(q) >= BLAS_MIN_QUERIES or hnsw or not isinstance(index, faiss.IndexFlat):
            return index.search(q, m, params=params)
        # a few queries against a flat index: numpy's matrix-vector product over FAISS's own vectors
        # (a view, no copy) measured 3x faster than FAISS's one-query scan (benchmarks/bench_gallery.py)
        xb = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
        scores = q @ xb.T
        top = np.argpartition(-scores, m - 1, axis=1)[:, :m] if m < index.ntotal else np.tile(np.arange(m), (len(q), 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return np.take_along_axis(top_scores, order, axis=1), np.take_along_axis(top, order, axis=1)

    def info(self) -> GalleryInfo:
        kind = self.index_kind()
        if self._state is None:
            return GalleryInfo(self.location, "folder (FAISS + SQLite)", kind or self._new_index, None, 0, 0)

        def read() -> tuple[int, list[dict]]:
            con = self._open_db()
            try:
                identities = con.execute("SELECT count(*) FROM identities").fetchone()[0]
                adds = [
                    {"time": t, "package": p, "engine": e, "precision": pr, "count": c}
                    for t, p, e, pr, c in con.execute(
                        "SELECT time, package, engine, precision, count FROM adds ORDER BY id"
                    )
                ]
            finally:
                con.close()
            return int(identities), adds

        identities, adds = self._retrying(read)
        return GalleryInfo(
            self.location, "folder (FAISS + SQLite)", str(kind), self.model(), identities, self._state["count"], adds
        )

    # ------------------------------------------------------------------ writing

    def _need_write(self) -> None:
        if self._lock is None:
            raise ArcdeployError(f"{self.location}: opened for reading; open it with write=True to change it")

    def add(
        self,
        vectors: np.ndarray,
        identities: Sequence[str],
        samples: Sequence[str],
        model: ModelIdentity,
        origin: dict,
    ) -> None:
        self._need_write()
        check_model(self.model(), model, self.location, str(origin.get("package", "the package")))
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            return
        loaded = self._load()
        self._loaded = None  # the in-memory index changes below; the next search reads the new files
        kind = self.index_kind() or self._new_index
        gen = (self._state["generation"] if self._state else 0) + 1
        self._make_folder()
        written: list[Path] = []
        try:
            db = self.path / f"samples-{gen:06d}.sqlite"
            written.append(db)
            self._write_db(db, identities, samples, origin, len(vectors))
            files = {"samples": _file_record(db)}
            count = (len(loaded.owners) if loaded else 0) + len(vectors)
            if kind == "int8":
                vpath = self.path / f"vectors-{gen:06d}.npy"
                written.append(vpath)
                old = self._exact_vectors() if loaded else None
                files["vectors"] = _write_npy(vpath, ([old] if old is not None else []) + [vectors], model.dim)
                index = self._int8_index(np.load(vpath, mmap_mode="r"), model.dim)
            else:
                index = loaded.index if loaded else self._empty_index(kind, model.dim)
                index.add(vectors)
            ipath = self.path / f"index-{gen:06d}.faiss"
            written.append(ipath)
            files["index"] = self._write_index(index, ipath)
            self._commit(gen, kind, model, files, count)
        except BaseException:
            for p in written:
                remove_path(p)
            raise
        finally:
            if loaded is not None:
                loaded.close()

    def remove(self, identity: str) -> int:
        self._need_write()
        loaded = self._load()
        number = loaded.number_of(identity) if loaded is not None else None
        if loaded is None or number is None:
            raise ArcdeployError(f"{self.location}: no identity {identity!r} in this gallery")
        self._loaded = None
        assert self._state is not None
        kind = self._state["index"]["kind"]
        model = self.model()
        assert model is not None
        gen = self._state["generation"] + 1
        gone = np.flatnonzero(loaded.owners == number)
        keep = np.ones(len(loaded.owners), bool)
        keep[gone] = False
        written: list[Path] = []
        try:
            db = self.path / f"samples-{gen:06d}.sqlite"
            written.append(db)
            shutil.copyfile(self._checked("samples"), db)
            con = sqlite3.connect(db)
            try:
                with con:
                    con.execute("DELETE FROM samples WHERE identity_id = ?", (number,))
                    con.execute("DELETE FROM identities WHERE id = ?", (number,))
            finally:
                con.close()
            files = {"samples": _file_record(db)}
            if kind == "int8":
                vpath = self.path / f"vectors-{gen:06d}.npy"
                written.append(vpath)
                old = self._exact_vectors()
                files["vectors"] = _write_npy(vpath, [_rows_where(old, keep)], model.dim)
                index = self._int8_index(np.load(vpath, mmap_mode="r"), model.dim)
            elif kind == "hnsw":  # FAISS cannot take nodes out of an HNSW graph: build it again
                remaining = loaded.index.reconstruct_n(0, loaded.index.ntotal)[keep]
                index = self._empty_index(kind, model.dim)
                if len(remaining):
                    index.add(remaining)
            else:
                index = loaded.index
                index.remove_ids(gone.astype(np.int64))  # keeps the order of the rows that stay
            ipath = self.path / f"index-{gen:06d}.faiss"
            written.append(ipath)
            files["index"] = self._write_index(index, ipath)
            self._commit(gen, kind, model, files, int(keep.sum()))
        except BaseException:
            for p in written:
                remove_path(p)
            raise
        finally:
            loaded.close()
        return len(gone)

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ helpers

    def _make_folder(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise disk_error(exc, self.path) from None

    def _clean_litter(self) -> None:
        """Files of generations that were never committed (a killed writer's); only ours."""
        if not self.path.is_dir():
            return
        keep = {f["name"] for f in self._state["files"].values()} if self._state else set()
        for entry in self.path.iterdir():
            if _OUR_LITTER.match(entry.name) and entry.name not in keep:
                log.info("removing %s (left by an interrupted change)", entry)
                remove_path(entry)
        clean_stale(self.path, META_NAME)

    def _write_db(self, db: Path, identities: Sequence[str], samples: Sequence[str], origin: dict, count: int) -> None:
        if self._state is not None:
            shutil.copyfile(self._checked("samples"), db)
        con = sqlite3.connect(db)
        try:
            # the file is not part of the gallery until gallery.json names it: no journal needed
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
            with con:
                if self._state is None:
                    con.executescript(SCHEMA)
                cur = con.execute(
                    "INSERT INTO adds (time, package, engine, precision, count) VALUES (?, ?, ?, ?, ?)",
                    (
                        time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        str(origin.get("package", "")),
                        origin.get("engine"),
                        origin.get("precision"),
                        count,
                    ),
                )
                add_id = cur.lastrowid
                con.executemany("INSERT OR IGNORE INTO identities (name) VALUES (?)", ((n,) for n in set(identities)))
                ids = {n: int(i) for i, n in con.execute("SELECT id, name FROM identities")}
                con.executemany(
                    "INSERT INTO samples (identity_id, name, add_id) VALUES (?, ?, ?)",
                    ((ids[i], s, add_id) for i, s in zip(identities, samples)),
                )
        except sqlite3.Error as exc:
            raise ArcdeployError(f"{db}: cannot write ({first_line(exc)})") from None
        finally:
            con.close()

    def _exact_vectors(self) -> np.ndarray:
        path = self._checked("vectors")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise _damaged(path, first_line(exc)) from None

    def _empty_index(self, kind: str, dim: int):
        faiss = self._faiss
        if kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            return index
        return faiss.IndexFlatIP(dim)

    def _int8_index(self, vectors: np.ndarray, dim: int):
        """An 8-bit scalar-quantized index of ``vectors``, its ranges the vectors' own per dimension."""
        faiss = self._faiss
        index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        floor = INT8_MIN_RANGE_SIGMAS / math.sqrt(dim)
        lo = np.full(dim, -floor, np.float32)
        hi = np.full(dim, floor, np.float32)
        for block in _blocks(vectors):
            lo = np.minimum(lo, block.min(axis=0))
            hi = np.maximum(hi, block.max(axis=0))
        faiss.copy_array_to_vector(np.concatenate([lo, hi - lo]).astype(np.float32), index.sq.trained)
        index.is_trained = True
        for block in _blocks(vectors):
            index.add(np.ascontiguousarray(block, dtype=np.float32))
        return index

    def _write_index(self, index, path: Path) -> dict:
        out = _HashingFile(path)
        try:
            self._faiss.write_index(index, self._faiss.PyCallbackIOWriter(out.write))
            return out.finish()
        except OSError as exc:
            raise disk_error(exc, path) from None
        finally:
            out.f.close()

    def _commit(self, gen: int, kind: str, model: ModelIdentity, files: dict, count: int) -> None:
        previous = self._state
        params: dict[str, Any] = {"metric": "inner_product"}
        if kind == "hnsw":
            params.update(M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)
        if kind == "int8":
            params.update(quantizer="QT_8bit", ranges="per-dimension min/max of the exact vectors")
        state = {
            "format": GALLERY_FORMAT,
            "generation": gen,
            "model": model.to_json(),
            "index": {"kind": kind, **params},
            "count": int(count),
            "files": files,
        }
        write_json_atomic(self.path / META_NAME, state)  # the commit point
        self._state = state
        if previous is not None:
            for rec in previous["files"].values():
                remove_path(self.path / rec["name"])


class _Missing(Exception):
    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


def _damaged(path: Path, why: str) -> ArcdeployError:
    return ArcdeployError(
        f"{path}: damaged ({why}); the gallery cannot be trusted: restore the folder from a backup or make it again"
    )


def _blocks(x: np.ndarray, rows: int = 65536) -> Iterable[np.ndarray]:
    for s in range(0, len(x), rows):
        yield np.asarray(x[s : s + rows])


def _rows_where(x: np.ndarray, keep: np.ndarray, rows: int = 65536) -> np.ndarray:
    """The rows of ``x`` (possibly memory-mapped) where ``keep`` is set, read block by block."""
    parts = [np.asarray(x[s : s + rows])[keep[s : s + rows]] for s in range(0, len(x), rows)]
    return np.concatenate(parts) if parts else np.empty((0, x.shape[1]), np.float32)


def _write_npy(path: Path, parts: list[np.ndarray], dim: int) -> dict:
    """A float32 .npy [N, dim] from row blocks, streamed, with its size and sha256."""
    rows = sum(len(p) for p in parts)
    out = _HashingFile(path)
    try:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
        np.lib.format.write_array_header_1_0(out, {**header, "shape": (rows, dim)})
        for part in parts:
            for block in _blocks(part):
                out.write(np.ascontiguousarray(block, dtype=np.float32).tobytes())
        return out.finish()
    except OSError as exc:
        raise disk_error(exc, path) from None
    finally:
        out.f.close()
