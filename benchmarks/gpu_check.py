"""The GPU path, measured in one run: torch fp16 / bf16 packages of r50 / r100 on a CUDA GPU.

For each architecture: a generated (untrained) checkpoint is exported and built as torch
fp16 and bf16 packages (each build checks its fidelity against the fp32 reference),
then benchmarked at batch 1 / 64 / 256 with the device synchronised, the host-to-device
copy timed apart from the compute. The table gives img/s, latency p50 / p99, and the
share of the GPU's measured dense bf16 matmul rate that the compute reaches
(GFLOP per image counted from the network's convolutions and linear layer).

    python benchmarks/gpu_check.py                      # on the GPU machine (a few minutes)
    python benchmarks/gpu_check.py --device cpu --archs r18 --precisions fp32 --batches 1,2 --seconds 0.3
                                                        # a smoke run of the same code on a CPU

Writes ``gpu_check.json`` (into $OUT when set) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def matmul_tflops(device: str, dtype_name: str, n: int = 8192, seconds: float = 2.0) -> float:
    """Dense matmul rate the device reaches (TFLOP/s), the yardstick for the network's share."""
    import torch

    from arcdeploy.engines.base import StopRule, time_calls

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    lat, _ = time_calls(lambda: a @ b, 0, StopRule(None, seconds))  # launches; the device catches up below
    sync()
    return 2 * n**3 * len(lat) / (time.perf_counter() - t0) / 1e12


def gflops_per_image(arch: str) -> float:
    """Multiply-adds x 2 of one 112x112 image, counted with hooks on the convolutions and linear layer."""
    import torch

    from arcdeploy.backbones import build_model

    model = build_model(arch)
    total = [0]

    def conv_hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        total[0] += 2 * k * out.numel()

    def linear_hook(mod, inp, out):
        total[0] += 2 * mod.in_features * out.numel()

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, torch.nn.Linear):
            m.register_forward_hook(linear_hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 112, 112))
    return total[0] / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="r50,r100")
    ap.add_argument("--precisions", default="fp16,bf16")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per batch size")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    ap.add_argument("--work", default=None, help="folder for checkpoints and packages (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    import arcdeploy
    from arcdeploy.bench import bench, parse_batches
    from arcdeploy.demo.synth import write_generated_checkpoint

    batches = parse_batches(args.batches)
    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if on_gpu else "CPU (smoke run)"
    peak_bf16 = matmul_tflops(args.device, "bfloat16" if on_gpu else "float32", n=8192 if on_gpu else 1024)
    print(
        f"device: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
        f"measured dense {'bf16' if on_gpu else 'fp32'} matmul: {peak_bf16:.1f} TFLOP/s",
        flush=True,
    )

    work = Path(args.work or tempfile.mkdtemp(prefix="arcdeploy-gpu-"))
    rows = []
    for arch in args.archs.split(","):
        gflop = gflops_per_image(arch)
        ckpt = work / f"{arch}.pth"
        if not ckpt.exists():
            t0 = time.perf_counter()
            write_generated_checkpoint(ckpt, arch, seed=0)
            print(
                f"{arch}: generated checkpoint in {time.perf_counter() - t0:.0f} s ({gflop:.1f} GFLOP/image)",
                flush=True,
            )
        export_dir = work / f"{arch}_export"
        if not export_dir.exists():
            arcdeploy.export(ckpt, export_dir)
        for precision in args.precisions.split(","):
            pkg_dir = work / f"{arch}_{precision}"
            t0 = time.perf_counter()
            arcdeploy.build(export_dir, pkg_dir, engine="torch", precision=precision, force=True, check_count=64)
            manifest = arcdeploy.load(pkg_dir).manifest
            fid = manifest.fidelity.to_json() if manifest.fidelity else {}
            cos = fid.get("cosine", {})
            print(
                f"{arch} {precision}: built in {time.perf_counter() - t0:.0f} s; fidelity cosine mean "
                f"{cos.get('mean', float('nan')):.6f} min {cos.get('min', float('nan')):.6f} "
                f"({'passed' if fid.get('passed') else 'BELOW FLOOR'})",
                flush=True,
            )
            res = bench(pkg_dir, batches=batches, duration=args.seconds, warmup=3).to_json()
            for r in res["results"]:
                bd = r.get("breakdown_ms") or {}
                compute_s = (bd.get("compute") or r["latency_ms"]["p50"]) / 1e3
                tflops = r["batch"] * gflop / compute_s / 1e3
                rows.append(
                    {
                        "arch": arch,
                        "precision": precision,
                        "batch": r["batch"],
                        "img_s": r["throughput"],
                        "p50_ms": r["latency_ms"]["p50"],
                        "p99_ms": r["latency_ms"]["p99"],
                        "h2d_ms": bd.get("h2d"),
                        "compute_ms": bd.get("compute"),
                        "d2h_ms": bd.get("d2h"),
                        "compute_img_s": r["batch"] / compute_s,
                        "tflops": tflops,
                        "share_of_matmul": tflops / peak_bf16,
                        "cos_mean": cos.get("mean"),
                        "cos_min": cos.get("min"),
                        "gflop_per_image": gflop,
                    }
                )
                print(
                    f"  batch {r['batch']:>4}: {r['throughput']:9.0f} img/s  p50 {r['latency_ms']['p50']:8.3f} ms  "
                    f"p99 {r['latency_ms']['p99']:8.3f} ms  compute-only {r['batch'] / compute_s:9.0f} img/s  "
                    f"{100 * tflops / peak_bf16:5.1f}% of matmul",
                    flush=True,
                )

    header = (
        f"{'arch':<5} {'prec':<5} {'batch':>5} {'img/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'h2d ms':>7} "
        f"{'comp ms':>8} {'TFLOP/s':>8} {'share':>6} {'cos mean':>9}"
    )
    print("\n" + header)
    for r in rows:
        h2d = f"{r['h2d_ms']:.3f}" if r["h2d_ms"] is not None else "-"
        comp = f"{r['compute_ms']:.3f}" if r["compute_ms"] is not None else "-"
        print(
            f"{r['arch']:<5} {r['precision']:<5} {r['batch']:>5} {r['img_s']:>9.0f} {r['p50_ms']:>8.3f} "
            f"{r['p99_ms']:>8.3f} {h2d:>7} {comp:>8} {r['tflops']:>8.1f} {100 * r['share_of_matmul']:>5.1f}% "
            f"{r['cos_mean'] or float('nan'):>9.6f}"
        )
    out_dir = Path(os.environ.get("OUT") or ".")
    doc = {
        "device": gpu,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "matmul_tflops": peak_bf16,
        "rows": rows,
    }
    (out_dir / "gpu_check.json").write_text(json.dumps(doc, indent=2))
    print(f"\nwrote {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
