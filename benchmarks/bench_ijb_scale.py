"""IJB-C at full size, from features: parse time, evaluation time, peak memory.

Generates (once, cached) meta files with IJB-C's sizes (469,375 images, 23,124
templates, 15,658,489 pairs of which 19,557 genuine) and random float32
features [N, 2, 512] (image, flipped image), then measures, in a fresh
process, ``read_meta`` (parsing the three files) and ``evaluate_features``
(flip sum, detector weighting, template aggregation, 15.6M pair scores, ROC,
TAR@FAR). Peak memory is that process's peak RSS (``ru_maxrss``), which
includes the memory-mapped features it touched.

Pairs are drawn uniformly over all template pairs, the worst case for the
block-wise scorer (every block needs every template).

    python benchmarks/bench_ijb_scale.py [--dir /tmp/arcdeploy_ijb_scale] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

IMAGES, TEMPLATES, PAIRS, GENUINE = 469_375, 23_124, 15_658_489, 19_557


def generate(root: Path, scale: float, seed: int = 0) -> None:
    n_img, n_tpl = int(IMAGES * scale), int(TEMPLATES * scale)
    n_pairs, n_gen = int(PAIRS * scale), max(1, int(GENUINE * scale))
    rng = np.random.default_rng(seed)
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    # every template gets at least one image; template ids are spread like IJB-C's (not 0..T-1)
    tids = np.sort(rng.choice(np.arange(1, 10 * n_tpl), n_tpl, replace=False))
    which = np.concatenate([np.arange(n_tpl), rng.integers(0, n_tpl, n_img - n_tpl)])
    rng.shuffle(which)
    tpl = tids[which]
    mid = which * 8 + rng.integers(0, 8, n_img)  # ~8 media per template at most, ids unique per template
    names = [f"{i + 1}.jpg" for i in range(n_img)]
    pts = rng.uniform(20, 200, (n_img, 10))
    score = rng.uniform(0.5, 1.0, n_img)
    with open(meta / "ijbc_face_tid_mid.txt", "w") as f:
        f.write("".join(f"{n} {t} {m}\n" for n, t, m in zip(names, tpl.tolist(), mid.tolist())))
    with open(meta / "ijbc_name_5pts_score.txt", "w") as f:
        f.write(
            "".join(
                n + " " + " ".join(f"{v:.2f}" for v in p) + f" {s:.6f}\n"
                for n, p, s in zip(names, pts.tolist(), score.tolist())
            )
        )
    a = rng.integers(0, n_tpl, n_pairs)
    b = (a + rng.integers(1, n_tpl, n_pairs)) % n_tpl
    label = np.zeros(n_pairs, np.int64)
    label[rng.choice(n_pairs, n_gen, replace=False)] = 1
    with open(meta / "ijbc_template_pair_label.txt", "w") as f:
        step = 1_000_000
        for s in range(0, n_pairs, step):
            f.write(
                "".join(
                    f"{x} {y} {z}\n"
                    for x, y, z in zip(
                        tids[a[s : s + step]].tolist(), tids[b[s : s + step]].tolist(), label[s : s + step].tolist()
                    )
                )
            )
    feats = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=np.float32, shape=(n_img, 2, 512))
    for s in range(0, n_img, 65536):
        e = min(n_img, s + 65536)
        feats[s:e] = rng.standard_normal((e - s, 2, 512), dtype=np.float32)
    feats.flush()
    del feats
    (root / "done.json").write_text(json.dumps({"scale": scale, "seed": seed}))


def measure(root: Path) -> dict:
    import resource

    from arcdeploy.evaluate.ijb import evaluate_features, load_features, read_meta

    t0, c0 = time.perf_counter(), time.process_time()
    meta = read_meta(root, "IJBC")
    t1, c1 = time.perf_counter(), time.process_time()
    rss_parse = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    feats = load_features(root / "features.npy")
    res = evaluate_features(meta, feats, name="random")
    t2, c2 = time.perf_counter(), time.process_time()
    return {
        "parse_cpu_s": c1 - c0,
        "evaluate_cpu_s": c2 - c1,
        "load_avg": os.getloadavg()[0],
        "images": meta.images,
        "templates": res.templates,
        "pairs": res.pairs,
        "genuine": res.genuine,
        "parse_s": t1 - t0,
        "evaluate_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_gib_after_parse": rss_parse,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "tar": res.tar.tolist(),
        "mode": res.mode,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/arcdeploy_ijb_scale", type=Path)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's size (default 1.0)")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = args.dir / f"scale{args.scale:g}" / "IJBC"
    if args.measure:
        print(json.dumps(measure(root)))
        return 0
    if not (root / "done.json").exists():
        print(f"generating meta files and features in {root} ...", flush=True)
        t = time.perf_counter()
        generate(root, args.scale)
        print(f"  generated in {time.perf_counter() - t:.1f} s", flush=True)
    # a fresh process, so that peak RSS is the evaluation's alone
    out = subprocess.run(
        [sys.executable, __file__, "--dir", str(args.dir), "--scale", str(args.scale), "--measure"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    if out.returncode:
        print(out.stderr, file=sys.stderr)
        return out.returncode
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"IJB-C scale {args.scale:g}: {r['images']:,} images, {r['templates']:,} templates, "
        f"{r['pairs']:,} pairs ({r['genuine']:,} genuine), features [N, 2, 512] float32, mode {r['mode']}"
    )
    print(
        f"| step | wall s | CPU s (all threads) |\n|---|---|---|\n"
        f"| parse meta files | {r['parse_s']:.1f} | {r['parse_cpu_s']:.1f} |\n"
        f"| evaluate (templates, scores, ROC, TAR) | {r['evaluate_s']:.1f} | {r['evaluate_cpu_s']:.1f} |\n"
        f"| total | {r['total_s']:.1f} | {r['parse_cpu_s'] + r['evaluate_cpu_s']:.1f} |"
    )
    print(f"{os.cpu_count()} CPUs; 1-min load average at the end: {r['load_avg']:.1f} (other work inflates wall time)")
    print(f"peak RSS: {r['peak_rss_gib']:.2f} GiB (after parsing: {r['peak_rss_gib_after_parse']:.2f} GiB)")
    print("TAR (random features, meaningless):", ["%.2f" % (100 * t) for t in r["tar"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
