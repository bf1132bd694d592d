"""Gallery search at 10^4 .. 10^6 vectors: the folder store (FAISS flat, int8, HNSW) and PostgreSQL +
pgvector (exact, HNSW) beside numpy's exact matmul + top-k on the same vectors, in one run.

Vectors: real embeddings of the shared LFW faces (grayscale and colour sets, the trained w600k_mbf,
fp32, 5-point landmarks), one photo per person held out as a probe and the rest enrolled under the
person's name, plus random unit vectors as distractors (one identity each) up to the gallery size.
Queries: the held-out real probes.

Per size and store: add rate (vectors/s for enrolling the whole gallery through the Gallery API:
files written, checksummed and committed; rows copied into PostgreSQL), memory (resident-set growth
when the gallery is opened and first searched; PostgreSQL: the table and index size on the server),
search latency p50/p99 for single queries and for batches of 100 (the stores are timed in turns,
query by query, so machine noise falls on all of them alike), recall@1 and @10 of the identities
against the exact answer, and rank-1 accuracy of the probes (their true identity first). numpy is
the floor: float32 matmul, the best 64 samples by argpartition, grouped by identity as the stores do.
10^7 is projected: memory from bytes per vector, exact search time linearly from 10^6.

    python benchmarks/bench_gallery.py [--sizes 10000,100000,1000000] [--pg-hnsw-max 100000]
        [--work /work/scratch/gallery/bench] [--json benchmarks/results/gallery.json]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from arcdeploy.gallery import ModelIdentity, open_gallery  # noqa: E402
from arcdeploy.gallery.store import best_identities  # noqa: E402
from real_material import FACES, MODELS  # noqa: E402

TOP_K = 10
BATCH = 100


def rss() -> int:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    return psutil.Process().memory_info().rss


def real_embeddings(work: Path) -> tuple[np.ndarray, list[str], list[str], ModelIdentity, str]:
    """Embeddings of the shared LFW faces (cached): vectors, identities, sample names, the model."""
    import arcdeploy
    from arcdeploy.gallery import embed_for_gallery
    from arcdeploy.gallery.api import model_of

    pkg_dir = work / "w600k_mbf_ort_fp32"
    if not (pkg_dir / "manifest.json").exists():
        arcdeploy.build(MODELS / "w600k_mbf.onnx", pkg_dir, engine="onnxruntime", precision="fp32", force=True)
    pkg = arcdeploy.load(pkg_dir)
    cache = work / "real_embeddings.npz"
    if not cache.exists():
        feats, ids, names = [], [], []
        for folder, marks in (("lfw", "lfw_5pts.txt"), ("lfw_colour", "lfw_colour_5pts.txt")):
            root = FACES / folder
            paths = sorted(root.rglob("*.jpg"))
            x, failures = embed_for_gallery(pkg, paths, landmarks=FACES / marks, root=root)
            bad = {f.index for f in failures}
            for i, p in enumerate(paths):
                if i not in bad:
                    feats.append(x[i])
                    ids.append(p.parent.name)
                    names.append(f"{folder}/{p.relative_to(root)}")
        np.savez(cache, x=np.asarray(feats, np.float32), ids=np.asarray(ids), names=np.asarray(names))
    z = np.load(cache)
    model, _ = model_of(pkg)
    return z["x"], [str(s) for s in z["ids"]], [str(s) for s in z["names"]], model, str(pkg_dir)


def split_probes(x, ids, names):
    """One photo per person with two or more held out as a probe; the rest enrolled."""
    last: dict[str, int] = {}
    counts: dict[str, int] = {}
    for i, who in enumerate(ids):
        last[who] = i
        counts[who] = counts.get(who, 0) + 1
    probe = sorted(i for who, i in last.items() if counts[who] >= 2)
    held = set(probe)
    enrol = [i for i in range(len(ids)) if i not in held]
    return (
        x[enrol],
        [ids[i] for i in enrol],
        [names[i] for i in enrol],
        x[probe],
        [ids[i] for i in probe],
    )


def distractors(n: int, dim: int, seed: int = 0):
    """``n`` random unit vectors, made in blocks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 100_000):
        b = rng.standard_normal((min(100_000, n - s), dim), dtype=np.float32)
        out[s : s + len(b)] = b / np.linalg.norm(b, axis=1, keepdims=True)
    return out


class NumpyExact:
    """The floor: float32 matmul over all vectors, the best 64 samples, grouped as the stores do."""

    def __init__(self, x: np.ndarray, owners: np.ndarray, names: dict[int, str]):
        self.x, self.owners, self.names = x, owners, names

    def search(self, q: np.ndarray, k: int):
        s = q @ self.x.T
        m = 64
        top = np.argpartition(-s, m, axis=1)[:, :m]
        out = []
        for row, cand in zip(s, top):
            order = cand[np.argsort(-row[cand])]
            if len(np.unique(self.owners[order])) < k:  # not enough identities among the 64: all of them
                order = np.argsort(-row)
            out.append(best_identities(row[order], self.owners[order], self.names, k))
        return out


def percentiles(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1000
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 3),
        "p99_ms": round(float(np.percentile(a, 99)), 3),
        "n": len(a),
    }


def recall(approx, exact) -> dict:
    r1 = np.mean([bool(a) and bool(e) and a[0].identity == e[0].identity for a, e in zip(approx, exact)])
    r10 = np.mean(
        [len({m.identity for m in a} & {m.identity for m in e}) / max(1, len(e)) for a, e in zip(approx, exact)]
    )
    return {"recall@1": round(float(r1), 5), "recall@10": round(float(r10), 5)}


def pg_url(server, db: str) -> str:
    # the HNSW build wants its graph in memory (pgvector); the server's other settings are its defaults
    return server.get_uri(db) + "&options=-c%20maintenance_work_mem%3D4GB"


def run_size(
    n: int, real, probes, model, work: Path, server, pg_hnsw_max: int, hnsw_max: int, all_probes: bool = False
) -> dict:
    xr, idr, namer = real
    qx, qids = probes
    dim = model.dim
    extra = max(0, n - len(xr))
    x = np.concatenate([xr, distractors(extra, dim, seed=n)])
    ids = idr + [f"distractor{i:07d}" for i in range(extra)]
    samples = namer + [f"random[{i}]" for i in range(extra)]
    raw_bytes = x.nbytes
    print(f"[{n}] {len(xr)} real + {extra} random vectors; {len(qx)} real probes", flush=True)

    names = sorted(set(ids))
    number = {name: i for i, name in enumerate(names)}
    numpy_store = NumpyExact(x, np.fromiter((number[i] for i in ids), np.int64, len(ids)), dict(enumerate(names)))
    stores: dict[str, dict] = {"numpy exact": {"search": numpy_store.search, "memory_bytes": raw_bytes}}

    kinds = [("folder flat", "flat"), ("folder int8", "int8")] + ([("folder hnsw", "hnsw")] if n <= hnsw_max else [])
    pg_kinds = []
    if server is not None:
        pg_kinds.append(("pgvector exact", "flat"))
        if n <= pg_hnsw_max:
            pg_kinds.append(("pgvector hnsw", "hnsw"))
    opened = []
    for label, kind in kinds + pg_kinds:
        if label.startswith("pgvector"):
            db = f"bench_{kind}_{n}"
            server.psql(f"DROP DATABASE IF EXISTS {db}; CREATE DATABASE {db};")
            loc: str | Path = pg_url(server, db)
        else:
            loc = work / f"g_{kind}_{n}"
            shutil.rmtree(loc, ignore_errors=True)
        t = time.perf_counter()
        with open_gallery(loc, write=True, index=kind) as g:
            for s in range(0, n, 250_000):  # enrolled in adds of at most 250k vectors
                g.add(x[s : s + 250_000], ids[s : s + 250_000], model, samples=samples[s : s + 250_000])
        add_s = time.perf_counter() - t
        before = rss()
        g = open_gallery(loc)
        g.search(qx[:1], model, top_k=TOP_K)  # loads the index
        entry: dict = {"add_s": round(add_s, 2), "add_vectors_per_s": round(n / add_s, 1)}
        if label.startswith("pgvector"):
            conn = g.store.conn  # type: ignore[attr-defined]
            size = conn.execute("SELECT pg_total_relation_size('arcdeploy_gallery_samples')").fetchone()[0]
            entry["memory_bytes"] = int(size)
            entry["memory_note"] = "table + indexes on the server (disk; shared_buffers 128 MB, the rest is OS cache)"
        else:
            entry["memory_bytes"] = int(rss() - before)
            entry["disk_bytes"] = sum(p.stat().st_size for p in Path(loc).iterdir())
        entry["search"] = lambda q, k, g=g: [r.matches for r in g.search(q, model, top_k=k)[0]]
        stores[label] = entry
        opened.append(g)
        print(f"[{n}] {label}: added in {add_s:.1f} s, memory {entry['memory_bytes'] / 2**20:.0f} MiB", flush=True)

    # single queries and batches of 100, the stores in turns; fewer at 10^6 (the exact ones take ~0.1-1 s)
    # fewer queries at 10^6: an exact scan there takes 0.1 .. 3 s a query on this 2-core machine
    singles = min(len(qx), 200 if n <= 100_000 else 10)
    batches = 5 if n <= 100_000 else 1
    # probes for recall and accuracy: all of them, but 100 for PostgreSQL above 10^5 (seconds a query)
    scored = {k: len(qx) if n <= 100_000 or all_probes or not k.startswith("pgvector") else 100 for k in stores}
    times: dict[str, dict[str, list[float]]] = {k: {"single": [], "batch": []} for k in stores}
    answers: dict[str, list] = {}
    for i in range(singles):
        for label, st in stores.items():
            t = time.perf_counter()
            st["search"](qx[i : i + 1], TOP_K)
            times[label]["single"].append(time.perf_counter() - t)
    rng = np.random.default_rng(1)
    for _ in range(batches):
        sel = rng.choice(len(qx), size=BATCH, replace=len(qx) < BATCH)
        for label, st in stores.items():
            t = time.perf_counter()
            st["search"](qx[sel], TOP_K)
            times[label]["batch"].append(time.perf_counter() - t)
    for label, st in stores.items():  # the probes for recall and accuracy
        res = []
        for s in range(0, scored[label], BATCH):
            res += st["search"](qx[s : min(s + BATCH, scored[label])], TOP_K)
        answers[label] = res
    for g in opened:
        g.close()

    exact = answers["numpy exact"]
    out: dict = {"vectors": n, "real_vectors": len(xr), "random_vectors": extra, "probes": len(qx), "stores": {}}
    numpy_batch = float(np.median(times["numpy exact"]["batch"]))
    for label, st in stores.items():
        res = answers[label]
        row = {k: v for k, v in st.items() if k != "search"}
        row["memory_vs_raw_fp32"] = round(row["memory_bytes"] / raw_bytes, 3)
        row["single"] = percentiles(times[label]["single"])
        row["batch100"] = percentiles(times[label]["batch"])
        row["batch100_vs_numpy"] = round(float(np.median(times[label]["batch"])) / numpy_batch, 3)
        row.update(recall(res, exact[: len(res)]))
        row["probes_scored"] = len(res)
        row["rank1_accuracy"] = round(float(np.mean([bool(r) and r[0].identity == q for r, q in zip(res, qids)])), 4)
        out["stores"][label] = row
        print(
            f"[{n}] {label:15s} single p50 {row['single']['p50_ms']:8.2f} ms  batch100 p50 "
            f"{row['batch100']['p50_ms']:9.1f} ms ({row['batch100_vs_numpy']:.2f}x numpy)  "
            f"recall@1 {row['recall@1']:.4f} @10 {row['recall@10']:.4f}  rank-1 {row['rank1_accuracy']:.3f}",
            flush=True,
        )
    if server is not None:
        for _, kind in pg_kinds:
            server.psql(f"DROP DATABASE IF EXISTS bench_{kind}_{n};")
    for _, kind in kinds:
        shutil.rmtree(work / f"g_{kind}_{n}", ignore_errors=True)
    return out


def project(results: list[dict], dim: int) -> dict:
    """10^7 from the largest size measured: memory by bytes per vector, exact search linearly."""
    big = max(results, key=lambda r: r["vectors"])
    scale = 10_000_000 / big["vectors"]
    out = {"from_vectors": big["vectors"], "stores": {}}
    for label, row in big["stores"].items():
        p = {"memory_GiB": round(row["memory_bytes"] * scale / 2**30, 1)}
        if "hnsw" not in label:  # exact scans grow with the gallery; a graph search does not (roughly log)
            p["single_p50_ms"] = round(row["single"]["p50_ms"] * scale, 1)
            p["batch100_p50_ms"] = round(row["batch100"]["p50_ms"] * scale, 1)
        if "add_s" in row:
            p["add_s"] = round(row["add_s"] * scale, 0)
        out["stores"][label] = p
    out["raw_fp32_GiB"] = round(10_000_000 * dim * 4 / 2**30, 1)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--pg-hnsw-max", type=int, default=100_000, help="largest size to build a pgvector HNSW index for")
    ap.add_argument("--hnsw-max", type=int, default=100_000, help="largest size to build a folder HNSW index for")
    ap.add_argument("--no-pg", action="store_true")
    ap.add_argument("--append", action="store_true", help="add these sizes to the sizes already in --json")
    ap.add_argument("--all-probes", action="store_true", help="recall and accuracy on every probe at every size")
    ap.add_argument("--work", default="/work/scratch/gallery/bench")
    ap.add_argument("--json", default=str(HERE / "results" / "gallery.json"))
    args = ap.parse_args()
    from arcdeploy.machine import machine_info

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    x, ids, names, model, pkg = real_embeddings(work)
    xr, idr, namer, qx, qids = split_probes(x, ids, names)
    server = None
    if not args.no_pg:
        import pgserver

        server = pgserver.get_server(work / "pgdata", cleanup_mode="stop")
    doc: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "all_cpu_flags": sorted(
            next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
        ),
        "load_average_start": list(os.getloadavg()),
        "package": pkg,
        "model": model.to_json(),
        "top_k": TOP_K,
        "faiss_threads": None,
        "sizes": [],
    }
    import faiss

    doc["faiss_threads"] = faiss.omp_get_max_threads()
    doc["versions"] = {"faiss": faiss.__version__}
    if server is not None:
        import psycopg

        with psycopg.connect(server.get_uri(), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            doc["versions"]["postgresql"] = conn.execute("SHOW server_version").fetchone()[0]
            doc["versions"]["pgvector"] = conn.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            ).fetchone()[0]
    if args.append and Path(args.json).exists():
        old = json.loads(Path(args.json).read_text())
        doc["sizes"] = old["sizes"]
        doc["command"] = old["command"] + " ; " + doc["command"]
        doc["load_average_start"] = old["load_average_start"]
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            doc["sizes"].append(
                run_size(
                    n,
                    (xr, idr, namer),
                    (qx, qids),
                    model,
                    work,
                    server,
                    args.pg_hnsw_max,
                    args.hnsw_max,
                    args.all_probes,
                )
            )
            doc["projection_1e7"] = project(doc["sizes"], model.dim)
            doc["load_average_end"] = list(os.getloadavg())
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    finally:
        if server is not None:
            server.cleanup()
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
