"""int8 on faces unlike its calibration set: cosine to fp32 by group, previous recipe vs now, and speed.

    python benchmarks/bench_faithful.py [--real ../shared/real] [--models mbf,w600k] [--workdir DIR] [--reuse]
                                        [--rounds 5] [--seconds 2] [--json FILE]

Faces (``--real``/faces, nothing copied: a check folder of symlinks under ``--workdir``):

- ``photos/``: the 12 colour photos (``photos_5pts.txt``);
- ``lfw_grayscale/``: the 400 grayscale LFW images of the 50 held-out people (the calibration people of
  ``bench_real.py`` are the other 50);
- ``lfw_colour_<group>/``: colour LFW images of the people at odd positions in sorted order, one folder
  per visual group label of ``lfw_colour_groups.tsv`` (the people at even positions are the colour
  calibration pool); the women / men split is computed from the same per-image results;
- small faces: the 12 photos shrunk so the detected face is 60, 80 and 100 px wide, and 150 colour LFW
  images of checked people at a random 60-100 px, each pasted into a 1920x1440 picture and found by
  SCRFD-500M (``arcdeploy check --detector``).

Calibration: ``gray`` = the first 300 images of the 50 grayscale calibration people; ``colour`` = the
first 300 images of the colour calibration pool.

Packages per model, OpenVINO unless said: fp32, bf16, int8 with the previous recipe (stem + spread +
head in float, NNCF's default averaged activation ranges; no fallback; calibrated gray, and colour),
int8 with the recipe (calibrated gray, and colour), ONNX Runtime int8 with the recipe (gray). Each is checked with
``arcdeploy.check`` on the check folder (by group: colour, face size, folder) and on the small faces.
Speed: the OpenVINO runtimes on a batch of 16 faces in interleaved rounds (``bench_real.measure_speed``),
img/s = median over rounds, ratios = medians of within-round ratios.

Writes ``benchmarks/results/faithful.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _common import DEFAULT_REAL, RESULTS, log, measure_speed

DEFAULT_JSON = RESULTS / "faithful.json"
MODELS = {"mbf": "mbf_w600k_gdc.pth", "w600k": "w600k_mbf.onnx"}
# (key, label, engine, precision, recipe: None | "previous" | "recipe", calibration: None | "gray" | "colour")
VARIANTS = [
    ("fp32", "OpenVINO fp32", "openvino", "fp32", None, None),
    ("bf16", "OpenVINO bf16", "openvino", "bf16", None, None),
    ("int8_prev_gray", "int8 previous recipe, calibrated grayscale", "openvino", "int8", "previous", "gray"),
    ("int8_prev_colour", "int8 previous recipe, calibrated colour", "openvino", "int8", "previous", "colour"),
    ("int8_gray", "int8 recipe, calibrated grayscale", "openvino", "int8", "recipe", "gray"),
    ("int8_colour", "int8 recipe, calibrated colour", "openvino", "int8", "recipe", "colour"),
    ("ort_int8_gray", "ONNX Runtime int8 recipe, calibrated grayscale", "onnxruntime", "int8", "recipe", "gray"),
]
SPEED_KEYS = ("fp32", "bf16", "int8_prev_gray", "int8_gray", "int8_colour")
CALIB_COUNT = 300


def material(real: Path, work: Path) -> dict:
    """The check folder + landmark file, calibration lists, small faces, and per-image metadata."""
    import cv2

    from arcdeploy.faces.detectors import open_detector
    from arcdeploy.faces.io import list_images, read_image

    faces = real / "faces"
    check = work / "check"
    rows: list[str] = []
    meta: dict[str, dict] = {}

    def link(folder: str, root: Path, names: list[str], lmk: Path, **extra) -> None:
        points = {ln.split()[0]: ln.split()[1:] for ln in lmk.read_text().splitlines() if ln.strip()}
        for n in names:
            dst = check / folder / n
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.is_symlink():
                dst.symlink_to(root / n)
            rows.append(f"{folder}/{n} " + " ".join(points[n]))
            meta[str(dst)] = {"folder": folder, **extra.get(n.split("/")[0], {})}

    photos = sorted(ln.split()[0] for ln in (faces / "photos_5pts.txt").read_text().splitlines() if ln.strip())
    link("photos", faces / "photos", photos, faces / "photos_5pts.txt")
    gray_people = sorted(p.name for p in (faces / "lfw").iterdir() if p.is_dir())
    held = [f"{p}/{f.name}" for p in gray_people[50:] for f in sorted((faces / "lfw" / p).glob("*.jpg"))]
    link("lfw_grayscale", faces / "lfw", held, faces / "lfw_5pts.txt")
    with open(faces / "lfw_colour_groups.tsv") as f:
        info = {r["identity"]: r for r in csv.DictReader(f, delimiter="\t")}
    names = [ln.split()[0] for ln in (faces / "lfw_colour_5pts.txt").read_text().splitlines() if ln.strip()]
    people = sorted({n.split("/")[0] for n in names})
    checked = set(people[1::2])
    by_group: dict[str, list[str]] = {}
    for n in names:
        if n.split("/")[0] in checked:
            by_group.setdefault(info[n.split("/")[0]]["group"], []).append(n)
    for group, group_names in by_group.items():
        link(f"lfw_colour_{group}", faces / "lfw_colour", group_names, faces / "lfw_colour_5pts.txt", **info)
    (work / "check_5pts.txt").write_text("\n".join(rows) + "\n")
    gray_calib = [
        str(faces / "lfw" / p / f.name) for p in gray_people[:50] for f in sorted((faces / "lfw" / p).glob("*.jpg"))
    ]
    colour_calib = [str(faces / "lfw_colour" / n) for n in names if n.split("/")[0] not in checked]
    (work / "calib_gray.txt").write_text("\n".join(gray_calib) + "\n")
    (work / "calib_colour.txt").write_text("\n".join(colour_calib) + "\n")

    small = work / "small"
    if not small.exists():
        small.mkdir()
        det = open_detector(real / "models" / "scrfd_500m_kps.onnx")
        rng = np.random.default_rng(21)
        sources = [(p, [60, 80, 100]) for p in list_images(faces / "photos")]
        pool = [faces / "lfw_colour" / n for n in names if n.split("/")[0] in checked]
        sources += [(pool[i], [int(rng.integers(60, 101))]) for i in sorted(rng.choice(len(pool), 150, replace=False))]
        for src, widths in sources:
            img = read_image(src)
            face = det.best(img)
            if face is None:
                continue
            for w in widths:
                s = w / face.width
                shrunk = cv2.resize(
                    img, (round(img.shape[1] * s), round(img.shape[0] * s)), interpolation=cv2.INTER_AREA
                )
                canvas = np.full((1440, 1920, 3), rng.integers(60, 200, 3), np.uint8)
                h, ww = shrunk.shape[:2]
                y, x = int(rng.integers(0, 1440 - h)), int(rng.integers(0, 1920 - ww))
                canvas[y : y + h, x : x + ww] = shrunk
                cv2.imwrite(
                    str(small / f"{src.parent.name}__{src.stem}__{w}px.jpg"), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)
                )
    return {
        "check": check,
        "check_5pts": work / "check_5pts.txt",
        "calib": {"gray": work / "calib_gray.txt", "colour": work / "calib_colour.txt"},
        "calib_landmarks": {"gray": faces / "lfw_5pts.txt", "colour": faces / "lfw_colour_5pts.txt"},
        "small": small,
        "meta": meta,
        "counts": {"checked_colour_people": len(checked), "colour_calib_pool": len(colour_calib)},
    }


def previous_recipe():
    from arcdeploy.quantize import QuantRecipe

    return QuantRecipe.for_this_cpu(keep_float=("stem", "spread", "head"), range_estimator="nncf_default")


def build_variant(src: Path, out: Path, variant: tuple, mat: dict, reuse: bool) -> float | None:
    import arcdeploy

    key, label, engine, precision, recipe, calibration = variant
    if reuse and (out / "manifest.json").exists():
        return None
    kwargs: dict = {
        "engine": engine,
        "precision": precision,
        "force": True,
        "check_images": mat["check"],
        "check_landmarks": mat["check_5pts"],
    }
    if precision == "int8":
        kwargs.update(
            calib=mat["calib"][calibration],
            calib_landmarks=mat["calib_landmarks"][calibration],
            calib_count=CALIB_COUNT,
        )
        if recipe == "previous":
            kwargs.update(recipe=previous_recipe(), fallback=False)
    log(f"  building {label} -> {out}")
    t = time.perf_counter()
    arcdeploy.build(src, out, **kwargs)
    return round(time.perf_counter() - t, 1)


def grouped_stats(result, names: list[str], meta: dict) -> dict:
    """Per group (the check's own groups, plus women / men of colour LFW) mean / min / n."""
    out = {g.label: {"n": g.n, "mean": g.mean, "min": g.min, "passed": g.passed} for g in result.groups.groups}
    cos = result.per_image
    for gender in ("female", "male"):
        idx = [i for i, n in enumerate(names) if meta.get(n, {}).get("gender") == gender]
        if idx:
            c = cos[idx]
            out[f"colour LFW: {gender}"] = {
                "n": len(idx),
                "mean": float(c.mean()),
                "min": float(c.min()),
                "passed": bool(c.min() >= 0.97 and c.mean() >= 0.99),
            }
    return out


def check_faces(mat: dict):
    """The check folder's aligned faces, their names and groups (loaded once)."""
    if "faces" not in mat:
        from arcdeploy.faces.calibration import load_images
        from arcdeploy.fidelity_groups import labels_of_image_set

        got = load_images(mat["check"], mat["check_5pts"], what="check images")
        mat["faces"] = (got.faces, got.names, labels_of_image_set(got))
    return mat["faces"]


def check_package(pkg: Path, mat: dict, scrfd: Path) -> dict:
    from arcdeploy.fidelity import check

    faces, names, labels = check_faces(mat)
    res = check(pkg, images=faces, labels=labels, images_label="check folder")
    small = check(pkg, images=mat["small"], detector=scrfd)
    return {
        "overall": res.cosine.to_json(),
        "passed": res.passed,
        "worst_group": res.groups.worst,
        "groups": grouped_stats(res, names, mat["meta"]),
        "lowest": list(res.groups.lowest[:5]),
        "small": {
            **small.cosine.to_json(),
            "passed": small.passed,
            "worst_group": small.groups.worst,
            "groups": {g.label: {"n": g.n, "mean": g.mean, "min": g.min} for g in small.groups.groups},
        },
    }


def run_model(name: str, real: Path, mat: dict, work: Path, args) -> dict:
    import arcdeploy
    from bench_real import ratio

    src = real / "models" / MODELS[name]
    rows = []
    for variant in VARIANTS:
        key, label, engine, precision, recipe, calibration = variant
        out = work / name / key
        row: dict = {
            "key": key,
            "label": label,
            "engine": engine,
            "precision": precision,
            "recipe": recipe,
            "calibration": calibration,
            "package": str(out),
        }
        try:
            row["build_s"] = build_variant(src, out, variant, mat, args.reuse)
            m = arcdeploy.load(out).manifest
            row["kept_float"] = len(m.calibration.kept_float) if m.calibration is not None else None
            row["build_gate"] = {
                "passed": m.fidelity.passed if m.fidelity is not None else None,
                "worst": m.fidelity.worst_group if m.fidelity is not None else None,
            }
            cached = out.parent / f"{key}.fidelity.json"  # --reuse: a reused package's check is reused too
            if args.reuse and row["build_s"] is None and cached.exists():
                row["fidelity"] = json.loads(cached.read_text())
            else:
                row["fidelity"] = check_package(out, mat, real / "models" / "scrfd_500m_kps.onnx")
                cached.write_text(json.dumps(row["fidelity"]))
            f = row["fidelity"]
            log(
                f"  {label}: check {f['overall']['mean']:.4f}/{f['overall']['min']:.4f} (worst {f['worst_group']}), "
                f"small {f['small']['mean']:.4f}/{f['small']['min']:.4f}"
            )
        except Exception as exc:  # one failed package is a row with its error
            row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            log(f"  {label}: FAILED {row['error']}")
        rows.append(row)
    faces = check_faces(mat)[0][:16]
    runtimes, xs = {}, {}
    for r in rows:
        if r["key"] in SPEED_KEYS and "error" not in r:
            pkg = arcdeploy.load(r["package"])
            runtimes[r["key"]] = pkg.runtime
            xs[r["key"]] = np.ascontiguousarray(pkg.to_model_input(faces))
    log(f"[{name}] speed: batch 16, {args.rounds} rounds x {args.seconds} s")
    per = measure_speed(runtimes, xs, args.rounds, args.seconds)
    for r in rows:
        if per.get(r["key"]):
            r["speed"] = {
                "img_per_s": statistics.median(per[r["key"]]),
                "rounds": per[r["key"]],
                "vs_fp32": ratio(per, r["key"], "fp32"),
                "vs_bf16": ratio(per, r["key"], "bf16"),
            }
    return {"model": name, "file": MODELS[name], "rows": rows}


def _f(v, fmt=".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _mm(d: dict | None) -> str:
    return "-" if not d else f"{d['mean']:.4f} / {d['min']:.4f}"


def markdown(doc: dict) -> str:
    out = []
    for model in doc["models"]:
        rows = [r for r in model["rows"] if "error" not in r]
        out += [
            f"### {model['file']}",
            "",
            "| package | colour photos | LFW grayscale held-out | all colour faces | worst colour LFW group "
            "| small faces (detector) | every group >= floor | img/s b16 | x fp32 | x bf16 |",
            "|---|---|---|---|---|---|---|---:|---:|---:|",
        ]
        for r in rows:
            g, sp, fid = r["fidelity"]["groups"], r.get("speed") or {}, r["fidelity"]
            colour = {k: v for k, v in g.items() if k.startswith("folder: lfw_colour_")}
            worst = min(colour.items(), key=lambda kv: kv[1]["min"]) if colour else None
            worst_text = worst[0].split("lfw_colour_")[1] + " " + _mm(worst[1]) if worst else "-"
            ok = "yes" if fid["passed"] and fid["small"]["passed"] else "NO"
            out.append(
                f"| {r['label']} | {_mm(g.get('folder: photos'))} | {_mm(g.get('folder: lfw_grayscale'))} | "
                f"{_mm(g.get('colour: colour'))} | {worst_text} | {_mm(fid['small'])} | {ok} | "
                f"{_f(sp.get('img_per_s'), '.1f')} | {_f(sp.get('vs_fp32'), '.2f')} | {_f(sp.get('vs_bf16'), '.2f')} |"
            )
        for r in model["rows"]:
            if "error" in r:
                out.append(f"| {r['label']} | error: {r['error']} | | | | | | | | |")
        keys = [r for r in rows if r["precision"] in ("int8", "bf16")]
        groups = sorted(
            {
                k
                for r in keys
                for k in r["fidelity"]["groups"]
                if k.startswith(("folder: lfw_colour_", "colour LFW:", "colour:", "face size:"))
            }
        )
        out += [
            "",
            "cosine mean / min by group (" + ", ".join(r["key"] for r in keys) + "):",
            "",
            "| group | n | " + " | ".join(r["key"] for r in keys) + " |",
            "|---|---:|" + "---|" * len(keys),
        ]
        for grp in groups:
            n = next((r["fidelity"]["groups"][grp]["n"] for r in keys if grp in r["fidelity"]["groups"]), "-")
            cells = []
            for r in keys:
                d = r["fidelity"]["groups"].get(grp)
                cells.append("-" if not d else (_mm(d) + ("" if d.get("passed", True) else " **below**")))
            out.append(f"| {grp.replace('folder: lfw_colour_', 'colour LFW: ')} | {n} | " + " | ".join(cells) + " |")
        out.append("")
    s = doc["settings"]
    out.append(
        f"Check faces: {doc['material']['check_faces']} (12 colour photos, 400 grayscale LFW of 50 held-out people, "
        f"colour LFW of {doc['material']['counts']['checked_colour_people']} people no colour calibration used, "
        f"foldered by group); small faces: {doc['material']['small_faces']} pictures, faces 60-100 px wide, found "
        f"by SCRFD-500M. int8 calibration: {s['calib_count']} faces. Floor: mean >= 0.99, min >= 0.97 on every "
        f"group. Speed: OpenVINO, batch 16, {s['rounds']} interleaved rounds of >= {s['seconds']} s, median img/s; "
        "ratios are medians of within-round ratios. Load average "
        + " / ".join(f"{x:.1f}" for x in doc["load_average"]["start"])
        + " at the start, "
        + " / ".join(f"{x:.1f}" for x in doc["load_average"].get("end", []))
        + " at the end."
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--models", default="mbf,w600k")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/arcdeploy-faithful"))
    ap.add_argument("--reuse", action="store_true", help="reuse packages already in --workdir")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--render", type=Path, default=None, metavar="JSON", help="only print the tables of a saved run")
    args = ap.parse_args(argv)
    if args.render:
        print(markdown(json.loads(args.render.read_text())))
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from arcdeploy.files import write_json_atomic
    from arcdeploy.utils import library_versions
    from machine_peak import cpu_summary

    real = args.real.resolve()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    mat = material(real, work)
    from arcdeploy.faces.io import list_images

    doc: dict = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_faithful.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": cpu_summary(),
        "load_average": {"start": list(os.getloadavg())},
        "versions": library_versions("arcdeploy", "openvino", "nncf", "onnxruntime", "numpy"),
        "settings": {"calib_count": CALIB_COUNT, "rounds": args.rounds, "seconds": args.seconds},
        "material": {
            "check_faces": len(mat["meta"]),
            "small_faces": len(list_images(mat["small"])),
            "counts": mat["counts"],
        },
        "models": [],
    }
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        log(f"[{name}]")
        doc["models"].append(run_model(name, real, mat, work, args))
    doc["load_average"]["end"] = list(os.getloadavg())
    doc["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.json, doc, force=True)
    print(markdown(doc))
    log(f"written {args.json} ({doc['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
