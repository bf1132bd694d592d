"""Build every package this machine can run for a generated r100 checkpoint and
compare its speed with a default ONNX Runtime fp32 session on the exported
model.onnx, measured in the same run.

    python benchmarks/bench_build.py [--arch r100] [--batch 16] [--iterations 5]
                                     [--calib-count 300] [--work DIR]

Prints one table: images/s at the batch size, median batch latency, the speed
ratio to the baseline, and each package's fidelity (per-image cosine to fp32
PyTorch, from its manifest). The checkpoint is UNTRAINED (arcdeploy.synth), so
speeds are real and fidelity is indicative only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def time_batches(fn, x, iterations: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="r100")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--calib-count", type=int, default=300)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", default="/tmp/arcdeploy-bench-build")
    ap.add_argument("--only", default=None, help="comma list of engine:precision[:fold] to build (default: all)")
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from arcdeploy.build import build
    from arcdeploy.export import export
    from arcdeploy.faces.preprocess import to_model_input
    from arcdeploy.package import load, read_manifest
    from arcdeploy.synth import aligned_faces, write_generated_checkpoint
    from arcdeploy.utils import cpu_name

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"{args.arch}.pth"
    if not ckpt.exists():
        t = time.time()
        write_generated_checkpoint(ckpt, args.arch)
        print(f"generated {args.arch} checkpoint in {time.time() - t:.0f}s", file=sys.stderr)
    exp_dir = work / f"{args.arch}_export"
    if not (exp_dir / "manifest.json").exists():
        t = time.time()
        export(ckpt, exp_dir, arch=args.arch, force=True)
        print(f"exported in {time.time() - t:.0f}s", file=sys.stderr)
    calib = aligned_faces(args.calib_count + 64, seed=42)
    faces = aligned_faces(args.batch, seed=7)

    configs = [("openvino", "fp32", False), ("openvino", "bf16", False), ("openvino", "fp16", False),
               ("openvino", "int8", True), ("onnxruntime", "fp32", False), ("onnxruntime", "int8", False),
               ("torch", "fp32", False)]
    if args.only:
        wanted = {tuple(s.split(":")[:2]) for s in args.only.split(",")}
        configs = [c for c in configs if c[:2] in wanted]

    rows = []
    # baseline: a default ONNX Runtime session on the exported model.onnx
    sess = ort.InferenceSession(str(exp_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = to_model_input(faces)
    base = statistics.median(time_batches(lambda b: sess.run(None, {"input": b}), x, args.iterations))
    rows.append(("onnxruntime default session", "fp32", "-", base, None, None))
    del sess

    for engine, precision, fold in configs:
        name = f"{engine}_{precision}{'_folded' if fold else ''}"
        t = time.time()
        pkg_dir = build(exp_dir, work / name, engine=engine, precision=precision, force=True, threads=args.threads,
                        calib=calib if precision == "int8" else None, calib_count=args.calib_count,
                        fold_preprocessing=fold, batch=args.batch if engine == "openvino" else None)
        built = time.time() - t
        m = read_manifest(pkg_dir)
        pkg = load(pkg_dir)
        xin = to_model_input(faces, pkg.input_format)
        med = statistics.median(time_batches(pkg.engine.infer, xin, args.iterations))
        executes = m.get("openvino", {}).get("executed", {}).get("inference_precision", "")
        label = f"{engine}{' (folded input, static batch)' if fold else ''}"
        rows.append((label, precision + (f" (runs {executes})" if executes and executes != {'fp32': 'f32', 'bf16': 'bf16', 'fp16': 'f16', 'int8': 'f32'}[precision] else ""),
                     f"{built:.0f}s", med, m["fidelity"]["cosine"], m["fidelity"]["passed"]))
        if engine == "openvino" and precision == "int8":
            tp = load(pkg_dir, performance_hint="THROUGHPUT")
            many = [xin] * 4
            tp.engine.infer_many(many)
            tms = []
            for _ in range(max(2, args.iterations // 2)):
                t = time.perf_counter()
                tp.engine.infer_many(many)
                tms.append((time.perf_counter() - t) / len(many))
            rows.append((label + " async THROUGHPUT x4", precision, "-", statistics.median(tms), m["fidelity"]["cosine"], m["fidelity"]["passed"]))
        del pkg

    print(f"\n{args.arch}, batch {args.batch}, {cpu_name()}, median of {args.iterations} batches")
    print(f"{'engine':48s} {'precision':20s} {'build':>6s} {'ms/batch':>9s} {'img/s':>8s} {'vs ORT':>7s}  "
          f"{'cos mean':>9s} {'cos min':>9s} floor")
    for label, prec, built, sec, cos, passed in rows:
        fid = f"{cos['mean']:9.6f} {cos['min']:9.6f} {'ok' if passed else 'BELOW'}" if cos else ""
        print(f"{label:48s} {prec:20s} {built:>6s} {sec * 1000:9.1f} {args.batch / sec:8.1f} {base / sec:6.2f}x  {fid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
