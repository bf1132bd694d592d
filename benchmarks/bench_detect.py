"""Face detection time per photo: SCRFD (ONNX Runtime, OpenVINO) and YuNet (OpenCV) on real photos.

    python benchmarks/bench_detect.py [--real ../shared/real] [--rounds 5] [--threads N] [--json FILE]

The photos (``faces/photos``, 12 images from 204x244 to 1024x1305) are decoded once; each round
times one ``detect`` call per photo for every detector in turn (interleaved, so a busy spell on
the shared machine hits all of them alike). Reported: the median over rounds of the mean time
per photo, the best round, and each detector's time relative to SCRFD on ONNX Runtime. Then the
throughput of ``detect_files`` (decode + detect, several worker threads) over the same photos.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

from _common import DEFAULT_REAL


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="the real test material folder")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="engine threads (default: the engine's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    from arcdeploy.engines.base import interleaved_rates
    from arcdeploy.faces.detect import detect_files
    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.io import list_images, read_image
    from arcdeploy.machine import machine_info

    real = args.real.resolve()
    models, photos_dir = real / "models", real / "faces" / "photos"
    if not photos_dir.is_dir():
        print(f"no real photos at {photos_dir}", file=sys.stderr)
        return 2
    paths = list_images(photos_dir)
    images = [read_image(p) for p in paths]
    setups = [
        ("SCRFD-500M", "onnxruntime", models / "scrfd_500m_kps.onnx"),
        ("SCRFD-500M", "openvino", models / "scrfd_500m_kps.onnx"),
        ("YuNet int8bq", "opencv", models / "yunet_2023mar_int8bq.onnx"),
    ]
    detectors = [
        open_detector(path, engine=engine if engine != "opencv" else "onnxruntime", threads=args.threads)
        for _, engine, path in setups
    ]
    for det in detectors:  # warm-up: first runs allocate and (OpenVINO) compile shapes
        for img in images[:3]:
            det.detect(img)

    # one pass over the photos per detector and round, in turns: ms per photo
    calls = {k: functools.partial(_detect_all, det, images) for k, det in enumerate(detectors)}
    rates = interleaved_rates(calls, dict.fromkeys(calls, len(images)), args.rounds, 0.0, warmup=0)
    per_round = [[1e3 / r for r in rates[k]] for k in range(len(detectors))]

    files_rate = []
    for det in detectors:
        t0 = time.perf_counter()
        res = detect_files(det, paths)
        files_rate.append(len(paths) / (time.perf_counter() - t0))
        assert not res.failures, res.failures

    info = machine_info()
    sizes = sorted(img.shape[0] * img.shape[1] for img in images)
    print(f"CPU: {info['cpu']} ({info['logical_cpus']} logical CPUs; {', '.join(info['flags'])})")
    print(f"{len(images)} photos, {sizes[0] / 1e6:.2f} to {sizes[-1] / 1e6:.2f} Mpixel; {args.rounds} rounds\n")
    base = statistics.median(per_round[0])
    header = f"{'detector':<14}{'engine':<13}{'ms/photo':>10}{'best':>8}{'vs SCRFD ORT':>14}{'files img/s':>13}"
    print(header)
    print("-" * len(header))
    rows = []
    for (name, engine, _), times, rate in zip(setups, per_round, files_rate):
        med = statistics.median(times)
        print(f"{name:<14}{engine:<13}{med:>10.1f}{min(times):>8.1f}{med / base:>13.2f}x{rate:>13.1f}")
        rows.append(
            {
                "detector": name,
                "engine": engine,
                "ms_per_photo": med,
                "best_ms": min(times),
                "relative": med / base,
                "files_per_s": rate,
            }
        )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rounds": args.rounds, "results": rows}, indent=2))
    return 0


def _detect_all(det, images) -> None:
    for img in images:
        det.detect(img)


if __name__ == "__main__":
    sys.exit(main())
