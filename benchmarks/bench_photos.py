"""Photos at engine speed: arcdeploy's photo path beside insightface's own loop and recognition alone.

    python benchmarks/bench_photos.py [--real ../shared/real] [--work DIR] [--rounds 3] [--lfw 96]
                                      [--grid] [--json FILE]

Material (``--real``): 12 MP JPEGs (the shared photos fitted to 4000x3000 / 3000x4000, quality 90,
``_photo_sets.py``), the real photos as they are (204x244 to 1024x1305), and LFW-size photos (``--lfw``
colour LFW images, 250x250, from the end of the sorted list: none of them calibrated the packages);
the first two listed ``--repeat`` times (default 3).
Packages, built once into ``--work`` (default: a folder in the system temp folder, kept for reruns):
``w600k_mbf.onnx`` as an OpenVINO int8 package (calibrated on colour LFW faces aligned with their
5-point file), and SCRFD-500M as an OpenVINO int8 detector package (640x640, batch axis; calibrated on
LFW colour photos and group photos tiled from them, checked on the real photos and another group photo).

Contestants, interleaved in every round (a busy spell on the shared machine hits each alike):

- insightface's loop (``_insightface_loop.py``: ``cv2.imread``, SCRFD at 640, ``norm_crop``,
  ``ArcFaceONNX`` on ONNX Runtime fp32 with its default threads), one photo at a time;
- arcdeploy: ``embed_files(package, photos, detector=PKG, all_faces=True)``: its default
  preparation workers (one more than the cores) decode, detect (one thread per call) and align
  beside the recognition engine (every core: the rule ``arcdeploy embed`` follows, see ``--grid``),
  in a process that keeps freed memory for reuse as the ``arcdeploy`` command does
  (:func:`arcdeploy.machine.keep_freed_memory`; insightface's loop runs in the same process, and
  its one decoding thread measured the same either way); with
  ``decode="full"`` (default: insightface's pixels), ``decode="reduced"`` (large JPEGs at 1/2 to
  1/8 with libjpeg's DCT scaling) and ``decode="planes"`` (large JPEGs as their Y, Cb, Cr planes,
  sampled in colour where the canvas and crops need them; needs the system's libturbojpeg);
- on the LFW-size photos, also a 256x256 SCRFD-500M int8 detector package (the photo at its own scale
  instead of blown up 2.56x into 640x640: a sixth of the detector's work, but not insightface's
  detection scale, so not its landmarks);
- recognition alone: ``Package.infer`` on the very crops arcdeploy aligned, in batches of 32.

Reported per set: photos/s and faces/s (median over rounds), and ratios taken within each round
(then the median): arcdeploy / insightface, and recognition-alone time / arcdeploy time for the same
faces ("x recognition alone": 1.0 would be photos at the engine's own speed). Where the time goes,
per photo (decode / detect / align / recognise), is measured in a separate serial pass (one photo
at a time, one thread per stage). Accuracy against insightface's loop: every face it finds is
found (box IoU >= 0.5) and the embeddings' cosine. ``--grid`` also times the thread rule against
other shares of the cores: preparation workers x detector threads per call x recognition threads x
detector batch, on the 12 MP set.
Written as a table and to ``results/photos.json`` (with the CPU and its flags, and the load average:
the machine is shared with other jobs, so compare the ratios, not the absolute rates).
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

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DEFAULT_REAL = HERE.parent / ".." / "shared" / "real"
DEFAULT_WORK = Path(tempfile.gettempdir()) / "arcdeploy-bench-photos"
# (preparation workers, detector threads per call, recognition threads, detector batch) for --grid
# (the first is arcdeploy's rule on 2 cores: a worker more than the cores, one thread per detector call,
# recognition on every core)
GRID = [(3, 1, 2, 1), (2, 1, 2, 1), (3, 1, 1, 1), (4, 1, 2, 1), (2, 2, 2, 1), (3, 1, 2, 8)]


def build_packages(real: Path, work: Path) -> dict[str, Path]:
    """The packages (built once): w600k_mbf int8 (and fp32, for the accuracy split), SCRFD-500M int8
    (640x640, and 256x256 for LFW-size photos) and bf16 detector packages."""
    import arcdeploy
    from _photo_sets import group_photo

    models, faces = real / "models", real / "faces"
    rec = work / "w600k_mbf_ov_int8"
    if not (rec / "manifest.json").exists():
        print("building w600k_mbf OpenVINO int8 ...", file=sys.stderr)
        arcdeploy.build(
            models / "w600k_mbf.onnx",
            rec,
            engine="openvino",
            precision="int8",
            calib=faces / "lfw_colour",
            calib_landmarks=faces / "lfw_colour_5pts.txt",
            calib_count=300,
            force=True,
        )
    rec_fp32 = work / "w600k_mbf_ort_fp32"
    if not (rec_fp32 / "manifest.json").exists():
        arcdeploy.build(
            models / "w600k_mbf.onnx",
            rec_fp32,
            engine="onnxruntime",
            precision="fp32",
            check_images=faces / "photos",
            check_landmarks=faces / "photos_5pts.txt",
            force=True,
        )
    lfw = sorted((faces / "lfw_colour").rglob("*.jpg"))[::9][:60]
    groups = [group_photo(real, work / f"calib_group_{s}.jpg", seed=s, start=100 * s) for s in (1, 2, 3, 4)]
    checks = sorted(p for p in (faces / "photos").rglob("*") if p.suffix.lower() in (".jpg", ".png"))
    checks.append(group_photo(real, work / "group.jpg"))
    out = {"recognition int8": rec, "recognition fp32": rec_fp32}
    # the 256x256 package is for LFW-size photos: calibrated and checked on such photos and the portraits
    # (a group photo's faces are 2-8 canvas pixels apart at 256: not what it is built for)
    lfw_sized = [*lfw, *sorted((faces / "lfw_colour").rglob("*.jpg"))[4::9][:20], *checks[:-1]]
    photos_for = {"int8": ([*lfw, *groups, *checks], len(lfw) + len(groups)), "int8 256": (lfw_sized, len(lfw))}
    for name, precision, size in (("int8", "int8", None), ("int8 256", "int8", (256, 256)), ("bf16", "bf16", None)):
        det = work / f"scrfd_500m_ov_{name.replace(' ', '_')}"
        calib, count = photos_for.get(name, photos_for["int8"])
        if not (det / "manifest.json").exists():
            print(f"building the SCRFD-500M OpenVINO {name} detector package ...", file=sys.stderr)
            arcdeploy.build(
                models / "scrfd_500m_kps.onnx",
                det,
                engine="openvino",
                precision=precision,
                calib=calib,
                calib_count=count,
                input_size=size,
                force=True,
            )
        out[f"detector {name}"] = det
    return out


def photo_sets(real: Path, work: Path, n_lfw: int, repeat: int = 1) -> dict[str, list[Path]]:
    """The three sets; the 12 MP and real photos listed ``repeat`` times (a run of a dozen photos is
    too short to keep both preparation workers busy to its end)."""
    from _photo_sets import twelve_mp_set
    from arcdeploy.faces.io import list_images

    lfw = sorted((real / "faces" / "lfw_colour").rglob("*.jpg"))
    return {
        "12 MP": twelve_mp_set(real, work / "12mp") * repeat,
        "photos": list_images(real / "faces" / "photos") * repeat,
        "LFW 250x250": lfw[-n_lfw:],
    }


# ---------------------------------------------------------------- the contestants


def run_insightface(loop, paths) -> tuple[float, list[list[dict]]]:
    t = time.perf_counter()
    found = [loop.run_file(p) for p in paths]
    return time.perf_counter() - t, found


def run_arcdeploy(package, detector, paths, workers: int | None):
    from arcdeploy.faces.pipeline import embed_files

    t = time.perf_counter()
    if hasattr(detector, "detector"):  # a Detection: the opened detector in it
        detector = detector.detector
    res = embed_files(package, paths, detector=detector, all_faces=True, workers=workers, progress=False)
    dt = time.perf_counter() - t
    if res.failures:
        raise SystemExit(f"unexpected failures: {res.failures[:3]}")
    return dt, res


def recognition_alone(package, crops: np.ndarray, batch: int = 32) -> float:
    t = time.perf_counter()
    for s in range(0, len(crops), batch):
        package.infer(crops[s : s + batch])
    return time.perf_counter() - t


# ---------------------------------------------------------------- where the time goes


def breakdown_arcdeploy(package, detection, paths) -> dict[str, float]:
    """ms per photo of each stage, one photo at a time (the preparation path's own functions)."""
    from arcdeploy.faces.align import aligned_from
    from arcdeploy.faces.prepare import decode_for_detection, faces_to_align, find_faces

    spent = {"decode": 0.0, "detect": 0.0, "align": 0.0, "recognise": 0.0}
    det = detection.detector
    for p in paths:
        t = time.perf_counter()
        img = decode_for_detection(p, str(p), None, det)
        spent["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        (found,) = find_faces([(p, str(p))], detection) if img.reduction > 1 else [None]
        if found is None:
            faces = det.detect_decoded([img])[0]
            spent["detect"] += time.perf_counter() - t
            from arcdeploy.faces.prepare import Found

            found = Found(img, faces)
        else:  # a reduced decode: find_faces decodes (again, maybe in full) and detects; take its decode out
            spent["detect"] += time.perf_counter() - t - _decode_seconds(found.image, p, det)
            img = found.image
        t = time.perf_counter()
        crops = np.stack([aligned_from(img, f.points) for _, f in faces_to_align(found, True)])
        spent["align"] += time.perf_counter() - t
        t = time.perf_counter()
        package.infer(crops)
        spent["recognise"] += time.perf_counter() - t
    return {k: 1e3 * v / len(paths) for k, v in spent.items()}


def _decode_seconds(img, path, det) -> float:
    from arcdeploy.faces.prepare import decode_for_detection

    t = time.perf_counter()
    decode_for_detection(path, str(path), None, det)
    return time.perf_counter() - t


def breakdown_insightface(loop, paths) -> dict[str, float]:
    from _insightface_loop import norm_crop

    spent = {"decode": 0.0, "detect": 0.0, "align": 0.0, "recognise": 0.0}
    for p in paths:
        t = time.perf_counter()
        bgr = cv2.imread(str(p))
        spent["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        _, kpss = loop.det.detect(bgr)
        spent["detect"] += time.perf_counter() - t
        t = time.perf_counter()
        crops = [norm_crop(bgr, k) for k in kpss]
        spent["align"] += time.perf_counter() - t
        t = time.perf_counter()
        for c in crops:
            loop.rec.get_feat([c])
        spent["recognise"] += time.perf_counter() - t
    return {k: 1e3 * v / len(paths) for k, v in spent.items()}


# ---------------------------------------------------------------- accuracy against insightface


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def against_insightface(found_if: list[list[dict]], res, paths) -> dict:
    """Every face insightface's loop found: embedded by arcdeploy too (box IoU >= 0.5)? The cosine of
    the embeddings. A face whose own points cannot align a crop (arcdeploy leaves such faces out:
    eyes under 3 px apart, a profile) is counted apart."""
    from arcdeploy.faces.align import landmarks_problem
    from arcdeploy.faces.io import image_size

    rows_of: dict[int, list[int]] = {}
    for r, fr in enumerate(res.faces):
        rows_of.setdefault(fr.image, []).append(r)
    missing, left_out, cosines = 0, 0, []
    for k, faces in enumerate(found_if):
        rows = rows_of.get(k, [])
        for f in faces:
            ious = [_iou(f["bbox"], res.faces[r].box) for r in rows]
            if not ious or max(ious) < 0.5:
                w, h = image_size(Path(paths[k]).read_bytes())[1]
                if landmarks_problem(f["kps"], (h, w)) or landmarks_problem(f["kps"], (w, h)):
                    left_out += 1
                else:
                    missing += 1
                continue
            e = f["embedding"] / np.linalg.norm(f["embedding"])
            cosines.append(float(e @ np.asarray(res.features[rows[int(np.argmax(ious))]])))
    return {
        "insightface_faces": sum(len(f) for f in found_if),
        "arcdeploy_faces": len(res.faces),
        "missing": missing,
        "left_out_degenerate": left_out,
        "cosine_min": min(cosines, default=float("nan")),
        "cosine_mean": float(np.mean(cosines)) if cosines else float("nan"),
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="packages and photo sets (kept for reruns)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lfw", type=int, default=96, help="LFW-size photos (default 96)")
    ap.add_argument("--repeat", type=int, default=3, help="times the 12 MP and real photos are listed (default 3)")
    ap.add_argument("--grid", action="store_true", help="also time the thread rule on the 12 MP set")
    ap.add_argument("--json", type=Path, default=HERE / "results" / "photos.json")
    args = ap.parse_args(argv)
    started = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_photos.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "load_average_start": list(os.getloadavg()),
    }
    import arcdeploy
    from _insightface_loop import InsightfaceLoop
    from arcdeploy.faces.detectors import DetectorSpec
    from arcdeploy.faces.pipeline import quiet_opencv
    from arcdeploy.faces.prepare import Detection, prepare_detected
    from arcdeploy.machine import keep_freed_memory, machine_info

    quiet_opencv()
    keep_freed_memory()  # as the arcdeploy command does
    real = args.real.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    built = build_packages(real, args.work)
    rec_path, det_path = built["recognition int8"], built["detector int8"]
    sets = photo_sets(real, args.work, args.lfw, args.repeat)
    loop = InsightfaceLoop(real / "models" / "scrfd_500m_kps.onnx", real / "models" / "w600k_mbf.onnx")
    workers = None  # the job's default (faces/job.py)
    # the engine on every core, on its own and beside the preparation workers (the rule: faces/detectors/registry.py)
    package = arcdeploy.load(rec_path)
    # what each arcdeploy contestant finds faces with: (detector, decode); the 256x256 package on LFW only
    setups = {
        "arcdeploy (decode full)": (det_path, "full"),
        "arcdeploy (decode reduced)": (det_path, "reduced"),
        "arcdeploy (decode planes)": (det_path, "planes"),
        "arcdeploy (256x256 detector)": (built["detector int8 256"], "full"),
    }
    opened = {c: Detection(DetectorSpec(d, threads=1, decode=m).open(), all_faces=True) for c, (d, m) in setups.items()}
    decodes = ["arcdeploy (decode full)", "arcdeploy (decode reduced)", "arcdeploy (decode planes)"]
    runs = {name: list(decodes) for name in sets}
    runs["LFW 250x250"] = ["arcdeploy (decode full)", "arcdeploy (256x256 detector)"]

    # warm-up; the crops recognition alone runs on (arcdeploy's own, decode full); accuracy
    crops, accuracy = {}, {}
    fp32 = arcdeploy.load(built["recognition fp32"])
    detectors = {
        "SCRFD int8 package": DetectorSpec(det_path, threads=1).open(),
        "SCRFD bf16 package": DetectorSpec(built["detector bf16"], threads=1).open(),
        "SCRFD source ONNX (fp32)": DetectorSpec(real / "models" / "scrfd_500m_kps.onnx", threads=1).open(),
    }
    if "LFW 250x250" in sets:
        detectors["SCRFD int8 256x256 package"] = opened["arcdeploy (256x256 detector)"].detector
    for name, paths in sets.items():
        _, found_if = run_insightface(loop, paths)
        for c in runs[name]:
            run_arcdeploy(package, opened[c], paths, workers)
        crops[name] = np.concatenate(
            [p.crops for p in prepare_detected([(p, i) for i, p in enumerate(paths)], opened[runs[name][0]])]
        )
        recognition_alone(package, crops[name])
        accuracy[name] = {}
        unique = list(dict.fromkeys(paths))
        _, found_if = run_insightface(loop, unique)
        for dname, det in detectors.items():
            if "256" in dname and name != "LFW 250x250":
                continue
            for rname, pkg in (("w600k int8 package", package), ("w600k fp32", fp32)):
                _, res = run_arcdeploy(pkg, det, unique, workers)
                accuracy[name][f"{dname} + {rname}"] = against_insightface(found_if, res, unique)
        for mode in ("reduced", "planes"):
            _, res = run_arcdeploy(package, opened[f"arcdeploy (decode {mode})"], unique, workers)
            accuracy[name][f"SCRFD int8 package, decode {mode} + w600k int8 package"] = against_insightface(
                found_if, res, unique
            )

    contestants = ["insightface loop", *setups, "recognition alone"]
    times: dict = {}
    faces: dict = {}
    for r in range(args.rounds):
        print(f"round {r + 1} of {args.rounds} ...", file=sys.stderr)
        for name, paths in sets.items():
            # the order turns each round, so no contestant always follows the same one: arcdeploy run
            # right after insightface's loop ran 4-9% slower on 12 MP photos than after another run of
            # its own (3 rounds; why is not known)
            order = ["insightface loop", *runs[name], "recognition alone"]
            k = r % len(order)
            for c in order[k:] + order[:k]:
                if c == "insightface loop":
                    dt, found_if = run_insightface(loop, paths)
                    count = sum(len(f) for f in found_if)
                elif c == "recognition alone":
                    dt, count = recognition_alone(package, crops[name]), len(crops[name])
                else:
                    dt, res = run_arcdeploy(package, opened[c], paths, workers)
                    count = len(res.faces)
                times.setdefault((name, c), []).append(dt)
                faces[(name, c)] = count

    med = statistics.median
    info = machine_info()
    print(f"\nCPU: {info['cpu']} ({info['logical_cpus']} logical CPUs; {', '.join(info['flags'])}); shared machine")
    print(
        f"median of {args.rounds} interleaved rounds, the order turned each round; "
        "ratios taken within each round, then the median\n"
    )
    print("| set | contestant | photos/s | faces/s | x insightface | x recognition alone |")
    print("|---|---|---:|---:|---:|---:|")
    table = []
    for name, paths in sets.items():
        n = len(paths)
        for c in contestants:
            if (name, c) not in times:
                continue
            ts = times[(name, c)]
            vs_if = med(a / b for a, b in zip(times[(name, "insightface loop")], ts))
            vs_rec = med(a / b for a, b in zip(times[(name, "recognition alone")], ts))
            row = {
                "set": name,
                "contestant": c,
                "photos": n,
                "faces": faces[(name, c)],
                "photos_per_s": n / med(ts),
                "faces_per_s": faces[(name, c)] / med(ts),
                "x_insightface": vs_if,
                "x_recognition_alone": vs_rec,
                "seconds_per_round": ts,
            }
            table.append(row)
            alone = c == "recognition alone"
            print(
                f"| {name} | {c} | {'-' if alone else format(row['photos_per_s'], '.1f')} | "
                f"{row['faces_per_s']:.1f} | {vs_if:.2f} | {'-' if alone else f'{vs_rec:.2f}'} |"
            )

    print("\nwhere the time goes, ms per photo (serial: one photo at a time, one thread per stage)")
    print("| set | path | decode | detect | align | recognise | total |")
    print("|---|---|---:|---:|---:|---:|---:|")
    breakdown = []
    for name, paths in sets.items():
        rows = {"insightface loop": breakdown_insightface(loop, paths)}
        for c in runs[name]:
            rows[c] = breakdown_arcdeploy(package, opened[c], paths)
        for path_name, ms in rows.items():
            breakdown.append({"set": name, "path": path_name, **ms})
            print(
                f"| {name} | {path_name} | {ms['decode']:.1f} | {ms['detect']:.1f} | {ms['align']:.1f} | "
                f"{ms['recognise']:.1f} | {sum(ms.values()):.1f} |"
            )

    print("\nagainst insightface's loop (fp32): its faces embedded by arcdeploy too, and the embeddings' cosine")
    for name in sets:
        for setup, a in accuracy[name].items():
            print(
                f"  {name}, {setup}: {a['insightface_faces'] - a['missing'] - a['left_out_degenerate']}/"
                f"{a['insightface_faces']} (left out, degenerate points: {a['left_out_degenerate']}), "
                f"cosine min {a['cosine_min']:.4f} mean {a['cosine_mean']:.4f}"
            )

    grid = []
    if args.grid:
        print("\nthe thread rule (12 MP set, decode reduced): workers x detector threads x recognition threads x batch")
        paths = sets["12 MP"]
        trials = {}
        for w, dthreads, rthreads, batch in GRID:
            spec = DetectorSpec(det_path, threads=dthreads, decode="reduced", batch=batch)
            trials[(w, dthreads, rthreads, batch)] = (
                arcdeploy.load(rec_path, threads=rthreads),
                Detection(spec.open(), True),
            )
        rates: dict = {k: [] for k in trials}
        for _ in range(args.rounds):
            for k, (pkg, det) in trials.items():
                dt, _ = run_arcdeploy(pkg, det, paths, k[0])
                rates[k].append(len(paths) / dt)
        base = rates[GRID[0]]
        for k in GRID:
            rel = med(a / b for a, b in zip(rates[k], base))
            grid.append(
                {
                    "workers": k[0],
                    "detector_threads": k[1],
                    "recognition_threads": k[2],
                    "detector_batch": k[3],
                    "photos_per_s": med(rates[k]),
                    "x_first": rel,
                    "rounds": rates[k],
                }
            )
            print(
                f"  workers {k[0]}, detector threads {k[1]}, recognition threads {k[2]}, batch {k[3]}: "
                f"{med(rates[k]):.1f} photos/s ({rel:.2f}x the first, within rounds)"
            )

    doc = {
        **started,
        "load_average_end": list(os.getloadavg()),
        "machine": info,
        "note": "shared machine (other jobs running): compare ratios taken within a round, not absolute rates",
        "packages": {
            name: json.loads((path / "manifest.json").read_text())["fidelity"] for name, path in built.items()
        },
        "rounds": args.rounds,
        "workers": workers or "the job's default: the CPUs + 1 (faces/job.py)",
        "sets": {k: len(v) for k, v in sets.items()},
        "results": table,
        "breakdown_ms_per_photo": breakdown,
        "accuracy_vs_insightface": accuracy,
        "thread_grid": grid,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2, default=float) + "\n")
        print(f"\nwritten {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
