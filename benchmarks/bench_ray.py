"""Scaling of ``embed --ray`` with the number of nodes, on loopback clusters started here.

For each node count, a Ray cluster of that many nodes is started on this machine (127.0.0.1
only, one CPU per node, a small object store), the images are embedded on it with
:func:`arcdeploy.distributed.embed_files_on_ray` (images read on the driver, one actor per node,
one engine thread each), and the cluster is stopped. Reported per run: the wall time, the
throughput once the actors run (from the first finished block on), and per node the images it
did and one busy actor's throughput. A local run with one engine thread is the baseline.

The IJB-C projection divides 469,375 images (each embedded twice with --flip) by the measured
throughput of one actor times the number of actors, so it assumes the actors of a larger
cluster keep this per-actor speed (nodes as fast per core as this one, the driver's disk and
network keeping up with the reading).

    python benchmarks/bench_ray.py --package PKG --images LIST|DIR [--landmarks FILE] [--count N]
                                   [--nodes 1,2] [--flip] [--batch 8] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IJBC_IMAGES = 469_375


def start_cluster(nodes: int):
    tmp = tempfile.mkdtemp(prefix="ardbench-", dir="/tmp")
    os.environ.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=tmp)
    os.environ.pop("RAY_ADDRESS", None)
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False  # every node on 127.0.0.1
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    for _ in range(nodes - 1):
        c.add_node(**node)
    assert c.address.startswith("127.0.0.1:"), c.address
    return c, tmp


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--images", required=True, help="a folder or list file")
    ap.add_argument("--landmarks", default=None)
    ap.add_argument("--count", type=int, default=None, help="the first N images only")
    ap.add_argument("--nodes", default="1,2")
    ap.add_argument("--flip", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    started = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_ray.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "load_average_start": list(os.getloadavg()),
    }

    from arcdeploy.distributed import RayOptions, embed_files_on_ray
    from arcdeploy.faces.io import images_root, list_images
    from arcdeploy.faces.pipeline import embed_files
    from arcdeploy.package import load

    paths = list_images(args.images)[: args.count]
    root = images_root(args.images)
    pkg = load(args.package, threads=1)
    t0 = time.perf_counter()
    local = embed_files(
        pkg,
        paths,
        landmarks=args.landmarks,
        flip=args.flip,
        raw=True,
        batch=args.batch,
        progress=False,
        workers=2,
        root=root,
    )
    local_rate = len(paths) / (time.perf_counter() - t0)
    print(f"local, 1 engine thread: {local_rate:.2f} images/s ({len(paths)} images, flip={args.flip})")
    runs = []
    for k in (int(x) for x in args.nodes.split(",")):
        cluster, tmp = start_cluster(k)
        try:
            res = embed_files_on_ray(
                pkg,
                paths,
                landmarks=args.landmarks,
                flip=args.flip,
                raw=True,
                batch=args.batch,
                progress=False,
                root=root,
                ray=RayOptions(address=cluster.address, actors=k, threads=1),
            )
        finally:
            cluster.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)
        same = bool(np.array_equal(res.features, local.features, equal_nan=True))
        per_actor = res.computed / sum(n.busy_s for n in res.nodes)
        run = {
            "nodes": k,
            "actors": res.actors,
            "images": res.computed,
            "wall_s": round(res.seconds, 2),
            "first_block_s": round(res.first_s, 2),
            "steady_images_per_s": round(res.steady_rate, 2),
            "per_actor_images_per_s": round(per_actor, 2),
            "identical_to_local": same,
            "per_node": [
                {"node": n.node_id[:12], "images": n.images, "per_actor_images_per_s": round(n.per_actor_rate, 2)}
                for n in res.nodes
            ],
        }
        runs.append(run)
        print(json.dumps(run))
    base = runs[0]["steady_images_per_s"]
    per_actor = min(r["per_actor_images_per_s"] for r in runs)
    print("\n| nodes (1 actor each) | wall s | first block s | images/s once running | speed-up | per-actor images/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        print(
            f"| {r['nodes']} | {r['wall_s']} | {r['first_block_s']} | {r['steady_images_per_s']} | "
            f"{r['steady_images_per_s'] / base:.2f}x | {r['per_actor_images_per_s']} |"
        )
    print(f"\nIJB-C ({IJBC_IMAGES} images{', flip' if args.flip else ''}) at {per_actor:.2f} images/s per actor:")
    print("| actors | hours |")
    print("|---:|---:|")
    projection = {}
    for actors in (1, 2, 4, 8, 16, 32, 64, 128):
        hours = IJBC_IMAGES / (actors * per_actor) / 3600
        projection[actors] = round(hours, 2)
        print(f"| {actors} | {hours:.2f} |")
    if args.json:
        from arcdeploy.machine import machine_info

        doc = {
            **started,
            "load_average_end": list(os.getloadavg()),
            "machine": machine_info(),
            "package": str(args.package),
            "manifest": {"arch": pkg.manifest.arch, "engine": pkg.manifest.engine, "precision": pkg.manifest.precision},
            "images": len(paths),
            "flip": args.flip,
            "batch": args.batch,
            "local_1_thread_images_per_s": round(local_rate, 2),
            "runs": runs,
            "ijbc_hours_by_actors": projection,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
