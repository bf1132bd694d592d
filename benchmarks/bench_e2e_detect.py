"""Raw photos in: detection + alignment + recognition end to end, against recognition alone.

    python benchmarks/bench_e2e_detect.py [--real ../shared/real] [--copies 8] [--rounds 3] [--batch 16]
                                          [--r50] [--json FILE]

Material: the 12 real photos (``faces/photos``, 204x244 to 1024x1305 pixels), listed ``--copies``
times; SCRFD-500M (``models/scrfd_500m_kps.onnx``) finds each photo's largest face; packages built
here from the real trained ``mbf_w600k_gdc.pth`` (OpenVINO fp32 and int8), and with ``--r50`` from a
generated (untrained, same speed) r50 checkpoint (OpenVINO int8).

Per package and round, interleaved so a busy spell on the shared machine hits every setup alike:

- recognition alone: ``Package.infer`` on the already prepared 112x112 crops of the same faces,
  in batches of ``--batch`` (the engine's own rate: no decoding, no detection, no alignment);
- end to end: ``embed_files(paths, detector=...)``: decode, detect, align in the pipeline's worker
  threads beside inference, for each detector setting (engine running SCRFD x its threads per
  detect call x preparation workers);

- right before each end-to-end run, preparation alone with the same setting (decode + detect +
  align through the pipeline's worker pool, no inference).

Reported: images/s (median over rounds) and, because the machine is shared and noisy, ratios
taken within each round (measurements seconds apart) and then the median: end to end /
recognition alone; end to end / preparation alone (1.0: recognition completely hidden behind
detection); and end to end / the serial bound 1 / (1/prep + 1/recog), the rate if the two stages
took turns on the CPU (on a machine whose cores both stages keep busy, overlapping them cannot
beat that bound by much; 1.0 means the pipeline itself costs nothing). Written as a table and, by
default, as ``results/e2e_detect.json`` beside this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import DEFAULT_REAL

HERE = Path(__file__).resolve().parent
# (engine running SCRFD, its threads per detect call, preparation workers)
SETTINGS = [("onnxruntime", 1, 2), ("onnxruntime", 2, 2), ("onnxruntime", 1, 3), ("openvino", 1, 2)]


def build_packages(real: Path, tmp: Path, r50: bool) -> list[tuple[str, Path]]:
    import arcdeploy

    models, faces = real / "models", real / "faces"
    ckpt = models / "mbf_w600k_gdc.pth"
    photos, points = faces / "photos", faces / "photos_5pts.txt"
    out = []
    print("building mbf OpenVINO fp32 ...", file=sys.stderr)
    out.append(
        (
            "mbf openvino fp32",
            arcdeploy.build(
                ckpt, tmp / "mbf_fp32", engine="openvino", precision="fp32", check_images=photos, check_landmarks=points
            ),
        )
    )
    print("building mbf OpenVINO int8 (calibrated on LFW faces found by SCRFD) ...", file=sys.stderr)
    out.append(
        (
            "mbf openvino int8",
            arcdeploy.build(
                ckpt,
                tmp / "mbf_int8",
                engine="openvino",
                precision="int8",
                calib=faces / "lfw",
                calib_detector=models / "scrfd_500m_kps.onnx",
                calib_count=150,
            ),
        )
    )
    if r50:
        from arcdeploy.demo.synth import write_generated_checkpoint
        from arcdeploy.synthetic import aligned_faces

        print("building a generated r50 OpenVINO int8 ...", file=sys.stderr)
        src = tmp / "r50.pth"
        write_generated_checkpoint(src, "r50")
        out.append(
            (
                "r50 (generated) openvino int8",
                arcdeploy.build(
                    src,
                    tmp / "r50_int8",
                    engine="openvino",
                    precision="int8",
                    calib=aligned_faces(214, seed=11),
                    calib_count=150,
                ),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="the real test material folder")
    ap.add_argument("--copies", type=int, default=6, help="times the 12 photos are listed (default 6)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--r50", action="store_true", help="also a generated r50 int8 package (slow to build)")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "e2e_detect.json")
    args = ap.parse_args(argv)
    started = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_e2e_detect.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "load_average_start": list(os.getloadavg()),
    }

    import numpy as np

    import arcdeploy
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.io import list_images
    from arcdeploy.faces.job import EmbedJob
    from arcdeploy.faces.pipeline import embed_files, prepare_batches
    from arcdeploy.faces.prepare import Detection, prepare_image
    from arcdeploy.machine import machine_info

    real = args.real.resolve()
    scrfd = real / "models" / "scrfd_500m_kps.onnx"
    photos = list_images(real / "faces" / "photos")
    if not photos or not scrfd.exists():
        print(f"no real photos or SCRFD at {real}", file=sys.stderr)
        return 2
    paths = photos * args.copies
    n = len(paths)
    detectors = {(e, t): open_detector(scrfd, engine=e, threads=t) for e, t, _ in SETTINGS}
    first = detectors[SETTINGS[0][:2]]
    crops = np.concatenate([prepare_image(p, detection=Detection(first)).crops for p in paths])
    batches = [(s, min(s + args.batch, n)) for s in range(0, n, args.batch)]

    def prep_rate(engine: str, threads: int, workers: int) -> float:
        detection = Detection(detectors[(engine, threads)])
        t0 = time.perf_counter()
        for _ in prepare_batches(EmbedJob(paths, workers=workers), batches, detection):
            pass
        return n / (time.perf_counter() - t0)

    def recog_rate(pkg) -> float:
        t0 = time.perf_counter()
        for s, e in batches:
            pkg.infer(crops[s:e])
        return n / (time.perf_counter() - t0)

    def e2e_rate(pkg, engine: str, threads: int, workers: int) -> float:
        t0 = time.perf_counter()
        res = embed_files(
            pkg, paths, detector=detectors[(engine, threads)], batch=args.batch, workers=workers, progress=False
        )
        dt = time.perf_counter() - t0
        if res.failures:
            raise SystemExit(f"unexpected failures: {res.failures[:3]}")
        return n / dt

    with tempfile.TemporaryDirectory(prefix="bench-e2e-detect-") as tmp:
        packages = [(name, arcdeploy.load(path)) for name, path in build_packages(real, Path(tmp), args.r50)]
        for _, pkg in packages:  # warm-up: engine compile, first-shape allocations
            recog_rate(pkg)
            for det in detectors.values():
                embed_files(pkg, photos, detector=det, batch=args.batch, progress=False)
        recog: dict[tuple, list[float]] = {(name, s): [] for name, _ in packages for s in SETTINGS}
        prep: dict[tuple, list[float]] = {(name, s): [] for name, _ in packages for s in SETTINGS}
        e2e: dict[tuple, list[float]] = {(name, s): [] for name, _ in packages for s in SETTINGS}
        for r in range(args.rounds):
            print(f"round {r + 1} of {args.rounds} ...", file=sys.stderr)
            for name, pkg in packages:
                for s in SETTINGS:  # the three measurements of one ratio seconds apart
                    recog[(name, s)].append(recog_rate(pkg))
                    prep[(name, s)].append(prep_rate(*s))
                    e2e[(name, s)].append(e2e_rate(pkg, *s))

    info = machine_info()
    med = statistics.median
    print(f"\nCPU: {info['cpu']} ({info['logical_cpus']} logical CPUs; {', '.join(info['flags'])}); shared machine")
    print(
        f"{n} images ({len(photos)} real photos x {args.copies}), SCRFD-500M 640x640, batch {args.batch}, "
        f"median of {args.rounds} interleaved rounds; ratios taken within each round\n"
    )
    cols = [
        "package",
        "SCRFD engine",
        "thr",
        "workers",
        "recognition",
        "preparation",
        "end to end",
        "e2e / recog",
        "e2e / prep",
        "e2e / serial",
    ]
    widths = [29, 12, 3, 7, 11, 11, 10, 11, 10, 12]
    print("img/s: recognition alone (prepared crops), preparation alone (decode + detect + align), end to end")
    print("| " + " | ".join(f"{c:<{w}}" for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    rows = []
    for name, pkg in packages:
        for s in SETTINGS:
            key = (name, s)
            rec, pr, end = recog[key], prep[key], e2e[key]
            serial = [1 / (1 / p + 1 / q) for p, q in zip(pr, rec)]
            ratios = {
                "e2e_to_recognition": med(a / b for a, b in zip(end, rec)),
                "e2e_to_preparation": med(a / b for a, b in zip(end, pr)),
                "e2e_to_serial_bound": med(a / b for a, b in zip(end, serial)),
            }
            cells = [
                name,
                s[0],
                str(s[1]),
                str(s[2]),
                f"{med(rec):.1f}",
                f"{med(pr):.1f}",
                f"{med(end):.1f}",
                *(f"{v:.2f}" for v in ratios.values()),
            ]
            print(
                "| "
                + " | ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
                + " |"
            )
            m = pkg.manifest
            rows.append(
                {
                    "package": name,
                    "arch": m.arch,
                    "engine": m.engine,
                    "precision": m.precision,
                    "detector_engine": s[0],
                    "detector_threads": s[1],
                    "workers": s[2],
                    "recognition_alone_ips": med(rec),
                    "preparation_ips": med(pr),
                    "end_to_end_ips": med(end),
                    **{f"ratio_{k}": v for k, v in ratios.items()},
                    "rounds": {"recognition": rec, "preparation": pr, "end_to_end": end},
                }
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    **started,
                    "load_average_end": list(os.getloadavg()),
                    "machine": info,
                    "images": n,
                    "batch": args.batch,
                    "rounds": args.rounds,
                    "detector": "SCRFD-500M scrfd_500m_kps.onnx 640x640",
                    "results": rows,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
