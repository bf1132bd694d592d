"""End-to-end embedding throughput vs engine-only throughput of the same package.

End to end = read loose-crop JPEGs (~250x250) + their 5 landmarks, decode,
align, infer (``arcdeploy.faces.pipeline.embed_files``). Engine only =
``Package.infer`` on the same faces already aligned in memory, at the same
batch. The ratio says how much of the engine's speed survives decoding and
alignment (the pipeline overlaps them with inference in a thread pool).

    python benchmarks/bench_embed.py --package PKG [--images 512] [--batch 16]
    python benchmarks/bench_embed.py --build CKPT|EXPORT_DIR --engine openvino --precision int8 [--calib DIR]
    python benchmarks/bench_embed.py --generate r18 --engine onnxruntime --precision fp32

Images are generated (arcdeploy.synthetic.draw_face) and written with cv2.imwrite;
runs alternate engine-only and end-to-end ``--repeat`` times and report the best
of each (the machine is shared; best-of is the least disturbed run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, n: int, size: int, quality: int = 95) -> tuple[list[Path], Path, np.ndarray]:
    import cv2

    from arcdeploy.faces import align_face
    from arcdeploy.synthetic import draw_face

    folder.mkdir(parents=True, exist_ok=True)
    paths, rows, crops = [], [], np.empty((n, 112, 112, 3), np.uint8)
    for i in range(n):
        img, lm = draw_face(i % 50, i, size=size)
        path = folder / f"{i:05d}.jpg"
        cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
        paths.append(path)
        rows.append(f"{path.name} " + " ".join(f"{v:.3f}" for v in lm.ravel()) + " 1.0")
        crops[i] = align_face(cv2.imread(str(path))[..., ::-1], lm)
    lmk = folder / "landmarks.txt"
    lmk.write_text("\n".join(rows) + "\n")
    return paths, lmk, crops


def time_engine(pkg, crops: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(crops), batch):
        pkg.infer(crops[s : s + batch])
    return time.perf_counter() - t0


def time_end_to_end(pkg, paths, lmk, batch: int, workers: int | None) -> float:
    from arcdeploy.faces.pipeline import embed_files

    t0 = time.perf_counter()
    res = embed_files(pkg, paths, landmarks=lmk, batch=batch, progress=False, workers=workers)
    dt = time.perf_counter() - t0
    if res.failures:
        raise SystemExit(f"unexpected failures: {res.failures[:3]}")
    return dt


def time_decode_align(paths, lmk, workers: int | None) -> float:
    """Decode + align alone, through the pipeline's thread pool (no inference)."""
    from arcdeploy.faces.job import EmbedJob
    from arcdeploy.faces.pipeline import prepare_batches

    job = EmbedJob.create(paths, landmarks=lmk, root=Path(paths[0]).parent, workers=workers)
    t0 = time.perf_counter()
    for _ in prepare_batches(job, [(s, min(s + 16, len(paths))) for s in range(0, len(paths), 16)]):
        pass
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--package", help="a built package")
    src.add_argument("--build", metavar="SRC", help="build a package from a checkpoint / export folder first")
    src.add_argument("--generate", metavar="ARCH", help="build from a generated (untrained) checkpoint of ARCH")
    ap.add_argument("--engine", default="openvino")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--calib", default=None, help="calibration images for int8 builds (default: generated)")
    ap.add_argument("--images", type=int, default=512, help="number of loose-crop JPEGs (default 512)")
    ap.add_argument("--size", type=int, default=250, help="loose crop side in pixels (default 250)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="engine threads")
    ap.add_argument("--workers", type=int, default=None, help="decode/align threads")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)

    import arcdeploy
    from arcdeploy.machine import cpu_name

    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        tmp = Path(tmp)
        if args.package:
            pkg_path = Path(args.package)
        else:
            from arcdeploy.builder import build

            source = args.build
            if args.generate:
                from arcdeploy.demo.synth import write_generated_checkpoint

                source = tmp / f"{args.generate}.pth"
                print(f"generating an untrained {args.generate} checkpoint ...", file=sys.stderr)
                write_generated_checkpoint(source, args.generate)
            calib = args.calib
            if calib is None and args.precision in ("int8", "qint8_mixed_float16"):
                calib_dir = tmp / "calib"
                make_images(calib_dir, 64, 112)  # aligned-size crops; landmarks unused
                calib = calib_dir
            print(f"building {args.engine} {args.precision} ...", file=sys.stderr)
            pkg_path = build(
                source,
                tmp / "pkg",
                engine=args.engine,
                precision=args.precision,
                calib=calib,
                batch=args.batch,
                threads=args.threads,
            )
        pkg = arcdeploy.load(pkg_path, threads=args.threads)
        print(f"writing {args.images} loose-crop JPEGs of {args.size}x{args.size} ...", file=sys.stderr)
        paths, lmk, crops = make_images(tmp / "images", args.images, args.size)

        time_engine(pkg, crops[: args.batch * 2], args.batch)  # warm-up: engine compile, caches
        time_end_to_end(pkg, paths[: args.batch * 2], lmk, args.batch, args.workers)
        eng, e2e, dec = [], [], []
        for _ in range(args.repeat):
            eng.append(time_engine(pkg, crops, args.batch))
            e2e.append(time_end_to_end(pkg, paths, lmk, args.batch, args.workers))
        dec.append(time_decode_align(paths, lmk, args.workers))

    n = args.images
    m = pkg.manifest
    rows = [
        ("engine only (aligned arrays)", n / min(eng)),
        ("decode + align only (no inference)", n / min(dec)),
        ("end to end (JPEG + landmarks)", n / min(e2e)),
    ]
    ratio = min(eng) / min(e2e)
    where = pkg_path if args.package else f"built from {args.build or 'a generated ' + args.generate} (temporary)"
    print(
        f"\npackage {where}: {m.get('arch')} {m.get('engine')} {m.get('precision')}, batch {args.batch}, "
        f"{n} images {args.size}x{args.size} JPEG, best of {args.repeat}"
    )
    print(f"cpu: {cpu_name()} ({os.cpu_count()} logical CPUs)\n")
    print(f"| {'stage':<36} | {'images/s':>9} | {'ms/image':>8} |")
    print(f"|{'-' * 38}|{'-' * 11}|{'-' * 10}|")
    for name, ips in rows:
        print(f"| {name:<36} | {ips:>9.1f} | {1000 / ips:>8.2f} |")
    print(f"\nend to end / engine only: {ratio * 100:.1f}%")
    if args.json:
        from arcdeploy.files import write_json_atomic

        write_json_atomic(
            args.json,
            {
                "package": str(pkg_path),
                "arch": m.get("arch"),
                "engine": m.get("engine"),
                "precision": m.get("precision"),
                "batch": args.batch,
                "images": n,
                "size": args.size,
                "repeat": args.repeat,
                "cpu": cpu_name(),
                "engine_only_ips": n / min(eng),
                "decode_align_ips": n / min(dec),
                "end_to_end_ips": n / min(e2e),
                "ratio": ratio,
                "times": {"engine": eng, "end_to_end": e2e, "decode_align": dec},
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
