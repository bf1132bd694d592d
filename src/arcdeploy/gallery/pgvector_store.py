"""The shared gallery: PostgreSQL with the pgvector extension (``GALLERY = postgresql://...``).

For several machines or servers that search and enrol into one gallery. Tables (in the
connection's schema; choose another with libpq's ``options=-csearch_path=NAME``)::

    arcdeploy_gallery_meta        key -> JSON: format, model, index
    arcdeploy_gallery_identities  id, name
    arcdeploy_gallery_adds        id, time, package, engine, precision, count
    arcdeploy_gallery_samples     id, identity_id, name, add_id, embedding vector(D)

Search is exact by default: the best samples by inner product over a sequential scan (an
exact top-N), grouped by identity as the folder store does (growing the number of samples until
``top_k`` identities are among them). ``--index hnsw`` adds pgvector's HNSW index
(``vector_ip_ops``): approximate, its candidates are grouped the same way.
Each change is one transaction (a killed ``add`` commits nothing) under a transaction-level
advisory lock, so a second writer is refused instead of interleaving. Driver: psycopg 3 and
pgvector's Python package (``pip install 'arcdeploy[postgres]'``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ArcdeployError, first_line
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

PREFIX = "arcdeploy_gallery"
META, IDENTITIES, ADDS, SAMPLES = (f"{PREFIX}_{t}" for t in ("meta", "identities", "adds", "samples"))
HNSW_M = 16  # pgvector's defaults
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 64
HNSW_EF_SEARCH_MAX = 1000  # pgvector's limit
FIRST_CANDIDATES = 64
PLAIN_STORAGE_MAX_DIM = 1536  # a row of a larger vector would not fit an 8 kB page uncompressed
URL_PREFIXES = ("postgresql://", "postgres://")
STORE_NAME = "PostgreSQL + pgvector"


def is_postgres_url(location: Any) -> bool:
    return isinstance(location, str) and location.startswith(URL_PREFIXES)


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    return re.sub(r"^(postgres(?:ql)?://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _driver():
    try:
        import psycopg
        from pgvector.psycopg import register_vector
    except ImportError:
        raise ArcdeployError(
            "a PostgreSQL gallery needs psycopg 3 and pgvector's Python package: pip install 'arcdeploy[postgres]'"
        ) from None
    return psycopg, register_vector


class PostgresGallery(GalleryStore):
    """A gallery in a PostgreSQL database (see the module doc)."""

    def __init__(self, url: str, write: bool = False, index: str | None = None):
        self.location = redact(url)
        self.writable = write
        if index is not None and index not in INDEX_KINDS:
            raise ArcdeployError(f"--index {index}: choose one of {', '.join(INDEX_KINDS)}")
        if index == "int8":
            raise ArcdeployError(
                "--index int8: not available in a PostgreSQL gallery (pgvector stores float32 vectors); "
                "use flat (exact) or hnsw"
            )
        self._psycopg, self._register_vector = _driver()
        try:
            self.conn = self._psycopg.connect(url, autocommit=True)
        except self._psycopg.Error as exc:
            raise ArcdeployError(f"{self.location}: cannot connect ({first_line(exc)})") from None
        self._vector_registered = False
        try:
            self._meta = self._read_meta()
            current = self._meta.get("index", {}).get("kind") if self._meta else None
            if index is not None and current is not None and index != current:
                raise ArcdeployError(
                    f"{self.location}: the gallery's index is {current}; --index {index} can only be chosen when a "
                    "gallery is made"
                )
        except BaseException:
            self.conn.close()
            raise
        self._new_index = index or "flat"

    # ------------------------------------------------------------------ plumbing

    def _error(self, exc: Exception, doing: str) -> ArcdeployError:
        return ArcdeployError(f"{self.location}: {doing} failed ({first_line(exc)})")

    def _register(self) -> None:
        if not self._vector_registered:
            self._register_vector(self.conn)
            self._vector_registered = True

    def _exists(self) -> bool:
        row = self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (SAMPLES,)).fetchone()
        return bool(row and row[0])

    def _read_meta(self) -> dict | None:
        try:
            if not self._exists():
                if not self.writable:
                    raise ArcdeployError(f"{self.location}: no gallery in this database (nothing was added yet)")
                return None
            self._register()
            rows = self.conn.execute(f"SELECT key, value FROM {META}").fetchall()
        except self._psycopg.Error as exc:
            raise self._error(exc, "reading the gallery") from None
        meta = dict(rows)  # jsonb values come back decoded
        fmt = meta.get("format")
        if not isinstance(fmt, str):
            raise ArcdeployError(f"{self.location}: {META} names no gallery format; not an arcdeploy gallery")
        from ..manifest import check_format

        check_format(fmt, GALLERY_FORMAT_NAME, GALLERY_FORMAT_VERSION, self.location, "a gallery", "make the gallery")
        ModelIdentity.from_json(meta.get("model"), self.location)
        if meta.get("index", {}).get("kind") not in ("flat", "hnsw"):
            raise ArcdeployError(f"{self.location}: {META} has no valid index kind; the gallery is damaged")
        return meta

    def _lock(self) -> None:
        """The writer's lock for this transaction (per schema), refused at once when held elsewhere."""
        row = self.conn.execute(
            "SELECT pg_try_advisory_xact_lock(hashtext(current_schema() || %s))", (f".{PREFIX}",)
        ).fetchone()
        if not (row and row[0]):
            raise ArcdeployError(f"{self.location}: is being written by another arcdeploy process")

    def _need_write(self) -> None:
        if not self.writable:
            raise ArcdeployError(f"{self.location}: opened for reading; open it with write=True to change it")

    # ------------------------------------------------------------------ the interface

    def model(self) -> ModelIdentity | None:
        return ModelIdentity.from_json(self._meta["model"], self.location) if self._meta else None

    def index_kind(self) -> str | None:
        return self._meta["index"]["kind"] if self._meta else None

    def add(
        self,
        vectors: np.ndarray,
        identities: Sequence[str],
        samples: Sequence[str],
        model: ModelIdentity,
        origin: dict,
    ) -> None:
        self._need_write()
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(vectors) == 0:
            return
        psycopg = self._psycopg
        try:
            with self.conn.transaction():
                self._lock()
                self._meta = self._read_meta()  # another writer may have made it meanwhile
                check_model(self.model(), model, self.location, str(origin.get("package", "the package")))
                kind = self.index_kind() or self._new_index
                if self._meta is None:
                    self._create(model, kind)
                add_id = self.conn.execute(
                    f"INSERT INTO {ADDS} (package, engine, precision, count) VALUES (%s, %s, %s, %s) RETURNING id",
                    (str(origin.get("package", "")), origin.get("engine"), origin.get("precision"), len(vectors)),
                ).fetchone()[0]
                names = sorted(set(identities))
                with self.conn.cursor() as cur:
                    cur.executemany(
                        f"INSERT INTO {IDENTITIES} (name) VALUES (%s) ON CONFLICT (name) DO NOTHING",
                        [(n,) for n in names],
                    )
                ids = dict(
                    self.conn.execute(f"SELECT name, id FROM {IDENTITIES} WHERE name = ANY(%s)", (names,)).fetchall()
                )
                with self.conn.cursor() as cur:
                    copy_sql = f"COPY {SAMPLES} (identity_id, name, add_id, embedding) FROM STDIN WITH (FORMAT BINARY)"
                    with cur.copy(copy_sql) as copy:
                        copy.set_types(["int4", "text", "int4", "vector"])
                        for ident, sample, vec in zip(identities, samples, vectors):
                            copy.write_row([ids[ident], sample, add_id, vec])
                if kind == "hnsw":
                    self._ensure_hnsw()
        except BaseException as exc:
            self._reread_meta()  # the transaction was rolled back, and with it a gallery it made
            if isinstance(exc, psycopg.Error):
                raise self._error(exc, "adding to the gallery") from None
            raise

    def _reread_meta(self) -> None:
        try:
            self._meta = self._read_meta() if self._exists() else None
        except Exception:  # the error that brought us here is the one to report
            self._meta = None

    def _create(self, model: ModelIdentity, kind: str) -> None:
        self.conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        self._vector_registered = False
        self._register()
        self.conn.execute(f"CREATE TABLE {META} (key text PRIMARY KEY, value jsonb NOT NULL)")
        self.conn.execute(f"CREATE TABLE {IDENTITIES} (id serial PRIMARY KEY, name text NOT NULL UNIQUE)")
        self.conn.execute(
            f"CREATE TABLE {ADDS} (id serial PRIMARY KEY, time timestamptz NOT NULL DEFAULT now(), "
            "package text NOT NULL, engine text, precision text, count integer NOT NULL)"
        )
        self.conn.execute(
            f"CREATE TABLE {SAMPLES} (id bigserial PRIMARY KEY, "
            f"identity_id integer NOT NULL REFERENCES {IDENTITIES}(id) ON DELETE CASCADE, name text NOT NULL, "
            f"add_id integer NOT NULL REFERENCES {ADDS}(id), embedding vector({int(model.dim)}) NOT NULL)"
        )
        if model.dim <= PLAIN_STORAGE_MAX_DIM:
            # kept in the row, not TOASTed: a 512-d vector is just over the TOAST threshold, and an exact
            # search reads every vector, so fetching each from the TOAST table would cost it dearly
            self.conn.execute(f"ALTER TABLE {SAMPLES} ALTER COLUMN embedding SET STORAGE PLAIN")
        self.conn.execute(f"CREATE INDEX {SAMPLES}_identity ON {SAMPLES} (identity_id)")
        index: dict[str, Any] = {"kind": kind, "metric": "inner_product"}
        if kind == "hnsw":
            index.update(m=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, ef_search=HNSW_EF_SEARCH)
        meta = {"format": GALLERY_FORMAT, "model": model.to_json(), "index": index}
        with self.conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {META} (key, value) VALUES (%s, %s::jsonb)", [(k, json.dumps(v)) for k, v in meta.items()]
            )
        self._meta = meta

    def _ensure_hnsw(self) -> None:
        # built after the first rows are in (faster than growing it row by row)
        self.conn.execute(
            f"CREATE INDEX IF NOT EXISTS {SAMPLES}_hnsw ON {SAMPLES} USING hnsw (embedding vector_ip_ops) "
            f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )

    def search(self, queries: np.ndarray, top_k: int) -> list[list[Match]]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if self._meta is None:
            return [[] for _ in range(len(q))]
        try:
            return [self._search_one(v, top_k) for v in q]
        except self._psycopg.Error as exc:
            raise self._error(exc, "searching the gallery") from None

    def _search_one(self, v: np.ndarray, top_k: int) -> list[Match]:
        """The best samples by inner product, grouped by identity as the folder store does: without
        an HNSW index the ORDER BY ... LIMIT is an exact top-N over a sequential scan (measured 3x
        faster than aggregating every row per identity); with one it is pgvector's graph search."""
        hnsw = self.index_kind() == "hnsw"
        m = max(4 * top_k, FIRST_CANDIDATES)
        while True:
            with self.conn.transaction():
                if hnsw:
                    ef = min(HNSW_EF_SEARCH_MAX, max(HNSW_EF_SEARCH, m))
                    self.conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
                rows = self.conn.execute(
                    f"SELECT identity_id, -(embedding <#> %s) FROM {SAMPLES} ORDER BY embedding <#> %s LIMIT %s",
                    (v, v, m),
                ).fetchall()
            owners = np.asarray([r[0] for r in rows], np.int64)
            scores = np.asarray([r[1] for r in rows], np.float64)
            # the first top_k distinct identities among the best samples are the top_k by their best
            # sample; with fewer, look further (unless every sample, or as many as HNSW returns, was seen)
            if len(rows) < m or (hnsw and m >= HNSW_EF_SEARCH_MAX) or distinct_count(owners) >= top_k:
                if not len(rows):
                    return []
                names = dict(
                    self.conn.execute(
                        f"SELECT id, name FROM {IDENTITIES} WHERE id = ANY(%s)", (sorted(set(owners.tolist())),)
                    ).fetchall()
                )
                return best_identities(scores, owners, names, top_k)
            m = m * 4 if not hnsw else min(m * 4, HNSW_EF_SEARCH_MAX)

    def remove(self, identity: str) -> int:
        self._need_write()
        try:
            with self.conn.transaction():
                self._lock()
                self._meta = self._read_meta()
                row = None
                if self._meta is not None:
                    row = self.conn.execute(f"SELECT id FROM {IDENTITIES} WHERE name = %s", (identity,)).fetchone()
                if row is None:
                    raise ArcdeployError(f"{self.location}: no identity {identity!r} in this gallery")
                cur = self.conn.execute(f"DELETE FROM {SAMPLES} WHERE identity_id = %s", (row[0],))
                gone = cur.rowcount
                self.conn.execute(f"DELETE FROM {IDENTITIES} WHERE id = %s", (row[0],))
        except self._psycopg.Error as exc:
            raise self._error(exc, "removing from the gallery") from None
        return int(gone)

    def info(self) -> GalleryInfo:
        if self._meta is None:
            return GalleryInfo(self.location, STORE_NAME, self._new_index, None, 0, 0)
        try:
            with self.conn.transaction():
                identities = self.conn.execute(f"SELECT count(*) FROM {IDENTITIES}").fetchone()[0]
                vectors = self.conn.execute(f"SELECT count(*) FROM {SAMPLES}").fetchone()[0]
                adds = [
                    {"time": t.isoformat(timespec="seconds"), "package": p, "engine": e, "precision": pr, "count": c}
                    for t, p, e, pr, c in self.conn.execute(
                        f"SELECT time, package, engine, precision, count FROM {ADDS} ORDER BY id"
                    ).fetchall()
                ]
        except self._psycopg.Error as exc:
            raise self._error(exc, "reading the gallery") from None
        return GalleryInfo(
            self.location, STORE_NAME, str(self.index_kind()), self.model(), int(identities), int(vectors), adds
        )

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            conn.close()
