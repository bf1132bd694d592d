"""The accuracy-aware int8 fallback on networks whose int8 misses the floor: fidelity reached and speed kept.

For each architecture (generated, untrained IResNet weights: the case where int8 loses a little
everywhere, unlike a trained MobileFaceNet that loses it in one layer) three OpenVINO packages
are built from the same export, calibrated on real LFW faces (the first 50 people) and checked on
every 4th image of the other 50 people:

- fp32;
- int8 with the default recipe and ``fallback=False`` (what the recipe alone reaches);
- int8 as ``arcdeploy build`` makes it by default: the recipe, then the fallback, which keeps
  the most sensitive layers in float until the validation faces clear the floor.

Then all three are timed in turns at one batch size (the median over rounds; the ratios are
medians of per-round ratios).

    python benchmarks/bench_fallback.py [--archs r50,r100] [--workdir DIR] [--reuse] [--json FILE]

The r100 fallback build ranks ~200 layers, one compile each: about 25 minutes on 2 cores.
Writes ``benchmarks/results/fallback.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np

from _common import DEFAULT_REAL, RESULTS, lfw_split, log, measure_speed

DEFAULT_JSON = RESULTS / "fallback.json"
VARIANTS = {
    "fp32": {"precision": "fp32"},
    "int8_recipe": {"precision": "int8", "fallback": False},
    "int8_fallback": {"precision": "int8"},
}


def build_all(arch: str, workdir: Path, real: Path, reuse: bool) -> dict[str, Path]:
    import arcdeploy
    from arcdeploy.demo.synth import write_generated_checkpoint

    split = lfw_split(real)  # the real-model benchmark's people: 50 for calibration, 50 others checked
    calib, held, landmarks = split["calib"], split["check"][::4], split["landmarks"]
    root = workdir / arch
    root.mkdir(parents=True, exist_ok=True)
    export = root / "export"
    if not (reuse and (export / "manifest.json").exists()):
        ckpt = root / "backbone.pth"
        log(f"[{arch}] generated checkpoint and export")
        write_generated_checkpoint(ckpt, arch, seed=0)
        arcdeploy.export(ckpt, export, force=True)
    out = {}
    for key, options in VARIANTS.items():
        pkg = root / f"pkg_{key}"
        out[key] = pkg
        if reuse and (pkg / "manifest.json").exists():
            continue
        log(f"[{arch}] building {key} -> {pkg}")
        kwargs = dict(options, engine="openvino", check_images=held, check_landmarks=landmarks, force=True)
        if options["precision"] == "int8":
            kwargs.update(calib=calib, calib_landmarks=landmarks)
        arcdeploy.build(export, pkg, **kwargs)
    return out


def measure(pkgs: dict[str, Path], batch: int, rounds: int, seconds: float) -> dict[str, list[float]]:
    import arcdeploy

    loaded = {k: arcdeploy.load(p) for k, p in pkgs.items()}
    x = np.random.default_rng(0).integers(0, 256, (batch, 112, 112, 3), dtype=np.uint8)
    return measure_speed(loaded, dict.fromkeys(loaded, x), rounds, seconds, min_runs=2)


def run_arch(arch: str, args) -> dict:
    import arcdeploy

    pkgs = build_all(arch, args.workdir, args.real, args.reuse)
    per = measure(pkgs, args.batch, args.rounds, args.seconds)
    rows = {}
    for key, path in pkgs.items():
        m = arcdeploy.load(path).manifest
        fb = (m.calibration.fallback if m.calibration else None) or {}
        fid = m.fidelity.to_json() if m.fidelity else {}
        rows[key] = {
            "package": str(path),
            "cosine": fid.get("cosine"),
            "passed": fid.get("passed"),
            "images_per_s": statistics.median(per[key]),
            "x_fp32": statistics.median(a / b for a, b in zip(per[key], per["fp32"])),
            "fallback": {
                k: fb.get(k)
                for k in ("candidates", "validation_before", "validation_after", "seconds", "speed")
                if k in fb
            }
            | ({"kept_float": len(fb["kept_float"])} if "kept_float" in fb else {})
            if fb
            else None,
        }
    return {"arch": arch, "per_round_images_per_s": per, "packages": rows}


def markdown(doc: dict) -> str:
    lines = [
        "| arch | package | cos mean | cos min | floor met | layers kept float by the fallback | img/s | x fp32 |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    labels = {"fp32": "OpenVINO fp32", "int8_recipe": "int8, recipe only", "int8_fallback": "int8 with fallback"}
    for res in doc["results"]:
        for key, r in res["packages"].items():
            cos = r.get("cosine") or {}
            fb = r.get("fallback") or {}
            kept = f"{fb['kept_float']} of {fb['candidates']}" if fb.get("kept_float") else "-"
            lines.append(
                f"| {res['arch']} | {labels.get(key, key)} | {cos.get('mean', float('nan')):.4f} "
                f"| {cos.get('min', float('nan')):.4f} | {'yes' if r.get('passed') else 'no'} | {kept} "
                f"| {r['images_per_s']:.1f} | {r['x_fp32']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="the real test material folder")
    ap.add_argument("--archs", default="r50,r100")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/arcdeploy-fallback"))
    ap.add_argument("--reuse", action="store_true", help="reuse the export and packages already in --workdir")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if not (args.real / "faces" / "lfw").is_dir():
        log(f"{args.real}: no real LFW faces here; this benchmark calibrates and checks on them")
        return 2
    from machine_peak import cpu_summary

    doc: dict = {
        "command": "python benchmarks/" + " ".join(shlex.quote(a) for a in [Path(__file__).name, *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": cpu_summary(),
        "load_average_start": list(os.getloadavg()),
        "batch": args.batch,
        "rounds": args.rounds,
        "seconds": args.seconds,
        "results": [run_arch(a.strip(), args) for a in args.archs.split(",") if a.strip()],
    }
    doc["load_average_end"] = list(os.getloadavg())
    from arcdeploy.files import write_json_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, doc)
    print(markdown(doc))
    log(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
