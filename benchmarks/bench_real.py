"""Real trained networks on real faces: fidelity, LFW accuracy and speed per engine, precision and int8 recipe.

    python benchmarks/bench_real.py [--real ../shared/real] [--models mbf,w600k] [--rounds 5] [--seconds 2]
                                    [--workdir /tmp/arcdeploy-real] [--reuse] [--json FILE]

Models (``--real``/models): ``mbf_w600k_gdc.pth`` (arcface_torch MobileFaceNet, the real trained w600k body
with a fitted GDC head) and insightface's ``w600k_mbf.onnx`` (built directly from the ONNX file; the file
itself is the fp32 reference).

Faces (``--real``/faces/lfw with ``lfw_5pts.txt``; 100 people x 8 images): the identities in sorted order;
the first 50 are the calibration people (their 400 images listed in order: an int8 build calibrates on the
first 300 and keeps the next 64 as validation faces for its accuracy-aware fallback); the other 50 people
(400 images) are the held-out check: each build's fidelity check runs on all of them
(``check_images`` + ``check_landmarks``, ``check_count=400``), so the cosine figures are those the build
records in its manifest, on people the calibration never saw.

Per model, built with ``arcdeploy.build``: OpenVINO fp32, bf16, int8 (the default recipe) and int8 with the
previous recipe (stem + head float only, overflow fix on the first layer, no fallback), ONNX Runtime fp32
and int8 (default recipe). Per package:

- cosine to the fp32 reference on the 400 held-out faces (mean, min, 1st percentile; the manifest's
  fidelity);
- LFW-600 accuracy (``bins/lfw_600.bin``, insightface's protocol: flip, 10 folds;
  ``arcdeploy.evaluate.binsets.evaluate_bins``); one pair is 1/60 of a fold = 0.17 point;
- what executes: OpenVINO's own report (``manifest.executed``: inference precision, precision per
  convolution); for ONNX Runtime the convolutions that run as int8 kernels (QLinearConv) in the graph
  ONNX Runtime optimises (ORT_ENABLE_EXTENDED), since a QDQ Conv whose output is not re-quantized stays
  a float Conv fed by DequantizeLinear;
- speed: the package runtimes (``Package.runtime.infer``, model time only) on a batch of 16 held-out
  faces, interleaved in rounds (each round runs every package for ``--seconds``, the order rotating):
  img/s = median over rounds; ratios = median over rounds of the ratio taken within the round (the
  machine is shared: within a round the packages see the same load).

Writes ``benchmarks/results/real_models.json`` and prints one markdown table per model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import DEFAULT_REAL, RESULTS, lfw_split, log, measure_speed

DEFAULT_JSON = RESULTS / "real_models.json"
MODELS = {
    "mbf": ("mbf_w600k_gdc.pth", "mbf_w600k_gdc.pth (arcface_torch mbf: trained w600k body, fitted GDC head)"),
    "w600k": ("w600k_mbf.onnx", "w600k_mbf.onnx (insightface model zoo, buffalo_sc recognition model)"),
}
CALIB_COUNT = 300
CHECK_COUNT = 400
PREVIOUS_LABEL = "int8, previous recipe (stem + head float)"
# (key, label, engine, precision, recipe: "default" | "previous" | None)
VARIANTS = [
    ("ov_fp32", "OpenVINO fp32", "openvino", "fp32", None),
    ("ov_bf16", "OpenVINO bf16", "openvino", "bf16", None),
    ("ov_int8", "OpenVINO int8", "openvino", "int8", "default"),
    ("ov_int8_prev", f"OpenVINO {PREVIOUS_LABEL}", "openvino", "int8", "previous"),
    ("ort_fp32", "ONNX Runtime fp32", "onnxruntime", "fp32", None),
    ("ort_int8", "ONNX Runtime int8", "onnxruntime", "int8", "default"),
]
OV_FP32, ORT_FP32 = "ov_fp32", "ort_fp32"


# ------------------------------------------------------------------ material


def recipe_for(kind: str | None):
    from arcdeploy.quantize import QuantRecipe

    if kind == "previous":
        return QuantRecipe.for_this_cpu(keep_float=("stem", "head"), overflow_fix="first_layer")
    return None  # the build's default: QuantRecipe.for_this_cpu()


# ------------------------------------------------------------------ building and measuring


def build_variant(src: Path, out: Path, variant: tuple, split: dict, reuse: bool) -> float | None:
    """Build one package (or reuse it); returns the build's seconds (None when reused)."""
    import arcdeploy

    key, label, engine, precision, recipe = variant
    if reuse and (out / "manifest.json").exists():
        return None
    kwargs: dict = {
        "engine": engine,
        "precision": precision,
        "check_images": split["check"],
        "check_landmarks": split["landmarks"],
        "check_count": CHECK_COUNT,
        "force": True,
    }
    if precision == "int8":
        kwargs.update(calib=split["calib"], calib_landmarks=split["landmarks"], calib_count=CALIB_COUNT)
        if recipe == "previous":
            kwargs.update(recipe=recipe_for("previous"), fallback=False)
    log(f"  building {label} -> {out}")
    t = time.perf_counter()
    arcdeploy.build(src, out, **kwargs)
    return time.perf_counter() - t


def ort_int8_convs(model_path: Path) -> dict:
    """Convolutions of an ONNX model as ONNX Runtime runs them after its graph optimisation:
    {"conv": float Conv count, "qlinearconv": int8 QLinearConv count}."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-real-ort-") as tmp:
        opt = Path(tmp) / "optimized.onnx"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(opt)
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node]
    return {"conv": ops.count("Conv") + ops.count("FusedConv"), "qlinearconv": ops.count("QLinearConv")}


def what_executes(pkg) -> dict:
    """What the package runs: inference precision and how many convolutions run as int8."""
    m = pkg.manifest
    ex = m.executed.to_json() if m.executed else {}
    out: dict = {"inference_precision": ex.get("inference_precision"), "note": ex.get("note")}
    if m.engine == "openvino":
        layers = ex.get("layers") or {}
        convs: dict[str, int] = {}
        for kind in ("Convolution", "GroupConvolution"):
            for prec, n in (layers.get(kind) or {}).items():
                convs[prec] = convs.get(prec, 0) + int(n)
        total = sum(convs.values())
        int8 = sum(n for p, n in convs.items() if p in ("u8", "i8"))
        out.update(convs_by_precision=convs, convs=total, int8_convs=int8, layers=layers)
        out["text"] = f"{out['inference_precision']}; int8 convs {int8}/{total}"
    else:
        counts = ort_int8_convs(pkg.manifest.file(pkg.path))
        total = counts["conv"] + counts["qlinearconv"]
        out.update(convs=total, int8_convs=counts["qlinearconv"], ort_optimized=counts)
        prec = "int8 QDQ + fp32" if m.precision == "int8" else m.precision
        out["text"] = f"{prec}; int8 convs {counts['qlinearconv']}/{total}"
    return out


def float_scope(m) -> dict:
    cal = m.calibration.to_json() if m.calibration else {}
    fb = cal.get("fallback") or {}
    return {
        "kept_float": cal.get("kept_float"),
        "fallback": {k: fb[k] for k in ("kept_float", "seconds", "validation_before", "validation_after") if k in fb}
        if fb
        else None,
        "recipe": (cal.get("recipe") or {}),
    }


def ratio(per: dict, key: str, base: str) -> float | None:
    if not per.get(key) or not per.get(base):
        return None
    return statistics.median(a / b for a, b in zip(per[key], per[base]))


def run_model(name: str, real: Path, split: dict, workdir: Path, args, check_faces: np.ndarray) -> dict:
    import arcdeploy
    from arcdeploy.evaluate.binsets import evaluate_bins

    file, title = MODELS[name]
    src = real / "models" / file
    bin_path = real / "bins" / "lfw_600.bin"
    rows: list[dict] = []
    log(f"[{name}] {src}")
    for variant in VARIANTS:
        key, label, engine, precision, recipe = variant
        out = workdir / name / key
        row: dict = {
            "key": key,
            "label": label,
            "engine": engine,
            "precision": precision,
            "recipe": recipe,
            "package": str(out),
        }
        try:
            row["build_s"] = build_variant(src, out, variant, split, args.reuse)
            pkg = arcdeploy.load(out)
            m = pkg.manifest
            fid = m.fidelity.to_json() if m.fidelity else {}
            row["fidelity"] = {
                **(fid.get("cosine") or {}),
                "passed": fid.get("passed"),
                "below_floor": fid.get("below_floor"),
                "floor": fid.get("floor"),
                "images": fid.get("images"),
            }
            row["manifest_build_seconds"] = m.build_seconds
            row["executed"] = what_executes(pkg)
            if precision == "int8":
                row["int8"] = float_scope(m)
            if not args.no_lfw and bin_path.exists():
                t = time.perf_counter()
                r = evaluate_bins(pkg, [bin_path])[0]
                row["lfw"] = {
                    "accuracy": r.accuracy,
                    "std": r.std,
                    "pairs": r.pairs,
                    "xnorm": r.xnorm,
                    "seconds": round(time.perf_counter() - t, 1),
                }
                log(
                    f"  {label}: cos mean {row['fidelity'].get('mean', float('nan')):.4f} "
                    f"min {row['fidelity'].get('min', float('nan')):.4f}, LFW {100 * r.accuracy:.2f}"
                )
        except Exception as exc:  # one failed package is a row with its error, the rest still run
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log(f"  {label}: FAILED {row['error']}")
        rows.append(row)

    ok = [r for r in rows if "error" not in r]
    log(f"[{name}] speed: batch {args.batch}, {args.rounds} rounds x {args.seconds} s per package")
    runtimes, xs = {}, {}
    faces = check_faces[: args.batch]
    for r in ok:
        pkg = arcdeploy.load(r["package"])
        runtimes[r["key"]] = pkg.runtime
        xs[r["key"]] = np.ascontiguousarray(pkg.to_model_input(faces))
        r["runtime"] = {k: v for k, v in pkg.describe().to_json().items() if k != "details"}
    per = measure_speed(runtimes, xs, args.rounds, args.seconds)
    for r in ok:
        tps = per.get(r["key"])
        if tps:
            r["speed"] = {
                "batch": args.batch,
                "img_per_s": statistics.median(tps),
                "rounds": tps,
                "ratio_vs_ov_fp32": ratio(per, r["key"], OV_FP32),
                "ratio_vs_ort_fp32": ratio(per, r["key"], ORT_FP32),
            }
    del runtimes
    return {"model": name, "file": file, "title": title, "rows": rows}


# ------------------------------------------------------------------ rendering


def _f(v, fmt: str, dash: str = "-") -> str:
    return dash if v is None else format(v, fmt)


def model_table(model: dict) -> str:
    head = "| package | cos mean | cos min | cos p1 | LFW-600 % | what executes | img/s b16 | x OV fp32 | x ORT fp32 |"
    lines = [head, "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in model["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | | | | | | |")
            continue
        fid, sp, ex = r.get("fidelity") or {}, r.get("speed") or {}, r.get("executed") or {}
        lfw = r.get("lfw")
        acc = f"{100 * lfw['accuracy']:.2f} ± {100 * lfw['std']:.2f}" if lfw else "-"
        extra = ""
        fb = (r.get("int8") or {}).get("fallback")
        if fb and fb.get("kept_float"):
            extra = f" (fallback: {len(fb['kept_float'])} more float)"
        lines.append(
            f"| {r['label']} | {_f(fid.get('mean'), '.4f')} | {_f(fid.get('min'), '.4f')} | "
            f"{_f(fid.get('p1'), '.4f')} | {acc} | {ex.get('text', '-')}{extra} | {_f(sp.get('img_per_s'), '.1f')} "
            f"| {_f(sp.get('ratio_vs_ov_fp32'), '.2f')} | {_f(sp.get('ratio_vs_ort_fp32'), '.2f')} |"
        )
    return "\n".join(lines)


def kept_float_notes(model: dict) -> list[str]:
    notes = []
    for r in model["rows"]:
        i8 = r.get("int8")
        if i8 and i8.get("kept_float") is not None:
            names = i8["kept_float"]
            notes.append(f"{r['label']}: {len(names)} layer(s) kept float: " + ", ".join(f"`{n}`" for n in names))
    return notes


def markdown(doc: dict, level: int = 2) -> str:
    """The real-model section: one table per model, then how it was measured."""
    h = "#" * level
    s = doc["settings"]
    out = []
    for model in doc["models"]:
        out += [f"{h} {model['title']}", "", model_table(model), ""]
        out += [f"- {n}" for n in kept_float_notes(model)] + [""]
    la = doc.get("load_average", {})
    out += [
        f"Cosine: per image against the package's fp32 reference, on the {s['check_count']} LFW images of the "
        f"{len(doc['material']['check_people'])} held-out people (never in the calibration set): the fidelity "
        "each build records in its manifest. int8 calibration: the first "
        f"{s['calib_count']} images of the other {len(doc['material']['calib_people'])} people (with "
        "`lfw_5pts.txt`). LFW-600: `lfw_600.bin` (the first 600 official LFW pairs, grayscale re-crops), "
        "insightface's protocol (flip, 10 folds), mean ± std over folds; one pair is 1/60 of a fold = 0.17 "
        "point, so differences of one or two pairs are noise. What executes: OpenVINO's report of the compiled "
        "model (inference precision of float layers; convolutions, depthwise included, that run in u8/i8); "
        "ONNX Runtime: QLinearConv nodes after its own graph optimisation. Speed: model time, batch "
        f"{s['batch']} of held-out faces, {s['rounds']} interleaved rounds of >= {s['seconds']} s per package, "
        "median img/s; the ratios are medians of per-round ratios. Shared 2-core machine: load average "
        + " / ".join(f"{x:.1f}" for x in la.get("start", []))
        + " at the start, "
        + " / ".join(f"{x:.1f}" for x in la.get("end", []))
        + " at the end (1 / 5 / 15 min).",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL, help="the real test material folder")
    ap.add_argument("--models", default="mbf,w600k", help="mbf, w600k or both (default)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/arcdeploy-real"), help="packages are built here")
    ap.add_argument("--reuse", action="store_true", help="reuse packages already in --workdir")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--no-lfw", action="store_true", help="skip the LFW-600 accuracy")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--render", type=Path, default=None, metavar="JSON", help="only print the tables of a saved run")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from arcdeploy.faces.calibration import load_images
    from arcdeploy.utils import library_versions
    from machine_peak import cpu_summary

    real = args.real.resolve()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for n in names:
        if n not in MODELS:
            raise SystemExit(f"unknown model {n!r}; choose from {', '.join(MODELS)}")
    split = lfw_split(real)
    started = time.perf_counter()
    doc: dict = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_real.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": cpu_summary(),
        "load_average": {"start": list(os.getloadavg())},
        "versions": library_versions("arcdeploy", "torch", "onnx", "onnxruntime", "openvino", "nncf", "numpy"),
        "settings": {
            "batch": args.batch,
            "rounds": args.rounds,
            "seconds": args.seconds,
            "calib_count": CALIB_COUNT,
            "check_count": CHECK_COUNT,
        },
        "material": {
            "lfw": str(real / "faces" / "lfw"),
            "calib_people": split["calib_people"],
            "check_people": split["check_people"],
            "calib_images_listed": len(split["calib"]),
            "check_images": len(split["check"]),
            "bin": str(real / "bins" / "lfw_600.bin"),
        },
        "models": [],
    }
    check_faces = load_images(split["check"], split["landmarks"], limit=args.batch, what="speed faces").faces
    for n in names:
        doc["models"].append(run_model(n, real, split, args.workdir.resolve(), args, check_faces))
    doc["load_average"]["end"] = list(os.getloadavg())
    doc["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from arcdeploy.files import write_json_atomic

    write_json_atomic(args.json, doc)
    print(markdown(doc))
    log(f"\nwritten {args.json} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
