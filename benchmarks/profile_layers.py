"""Where an OpenVINO package spends its time: per-layer performance counters.

Compiles the package's model with the package's own settings plus
``PERF_COUNT=YES``, runs a few batches, and sums each layer's ``real_time``
from ``InferRequest.get_profiling_info()`` by layer type (Convolution, PReLU,
Eltwise, FullyConnected, Reorder, ...) and by the kernel that ran it
(``exec_type``, e.g. ``jit_avx2_FP32`` or ``jit_avx2_I8``, which says the
precision it executed in).

    python benchmarks/profile_layers.py PKG [PKG ...] [--batch 16] [--iterations 2]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import numpy as np

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
if SRC not in sys.path:
    sys.path.insert(0, SRC)


def profile_package(pkg_dir, batch: int = 16, iterations: int = 2, threads: int | None = None) -> dict:
    """{"by_type": {type: ms per batch}, "by_exec": {(type, exec_type): ms}, "total_ms": ...},
    averaged over iterations."""
    import openvino as ov

    from arcdeploy.demo.synth import aligned_faces
    from arcdeploy.engines.openvino import compile_config
    from arcdeploy.faces.preprocess import to_model_input
    from arcdeploy.package import read_manifest

    manifest = read_manifest(pkg_dir)
    if manifest.get("engine") != "openvino":
        raise ValueError(f"{pkg_dir}: per-layer counters need an OpenVINO package, this is {manifest.get('engine')}")
    core = ov.Core()
    model = core.read_model(os.path.join(pkg_dir, manifest["files"]["model"]))
    config = compile_config(manifest, threads)
    config["PERF_COUNT"] = True
    cm = core.compile_model(model, manifest.get("openvino", {}).get("device", "CPU"), config)
    req = cm.create_infer_request()
    faces = aligned_faces(min(batch, 16), seed=11)
    faces = np.tile(faces, (-(-batch // faces.shape[0]), 1, 1, 1))[:batch]
    x = to_model_input(faces, manifest["input"])
    req.infer({0: x})  # warm-up (first run includes one-time work)
    by_type: dict[str, float] = defaultdict(float)
    by_exec: dict[tuple[str, str], float] = defaultdict(float)
    total = 0.0
    for _ in range(iterations):
        req.infer({0: x})
        for info in req.get_profiling_info():
            if str(info.status).endswith("NOT_RUN"):
                continue
            ms = info.real_time.total_seconds() * 1e3
            by_type[info.node_type] += ms / iterations
            by_exec[(info.node_type, info.exec_type)] += ms / iterations
            total += ms / iterations
    return {
        "package": str(pkg_dir),
        "precision": manifest.get("precision"),
        "batch": batch,
        "iterations": iterations,
        "total_ms": total,
        "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
        "by_exec": {f"{t} [{e}]": v for (t, e), v in sorted(by_exec.items(), key=lambda kv: -kv[1])},
    }


def format_profiles(profiles: list[dict], top: int = 8) -> str:
    """A markdown table: layer type x package, ms per batch and share of the total."""
    types: list[str] = []
    for p in profiles:
        for t in list(p["by_type"])[:top]:
            if t not in types:
                types.append(t)
    head = "| layer type | " + " | ".join(f"{p['label']} (batch {p['batch']})" for p in profiles) + " |"
    lines = [head, "|---|" + "---:|" * len(profiles)]
    for t in types:
        cells = []
        for p in profiles:
            ms = p["by_type"].get(t, 0.0)
            cells.append(f"{ms:.1f} ms ({100 * ms / p['total_ms']:.0f}%)" if ms else "-")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("| **sum of layers** | " + " | ".join(f"**{p['total_ms']:.1f} ms**" for p in profiles) + " |")
    lines.append("")
    lines.append("Kernels (exec_type) of the costliest entries:")
    lines.append("")
    for p in profiles:
        tops = list(p["by_exec"].items())[:4]
        lines.append(f"- {p['label']}: " + "; ".join(f"{k} {v:.1f} ms" for k, v in tops))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Per-layer time of OpenVINO packages (PERF_COUNT).")
    ap.add_argument("packages", nargs="+")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    profiles = []
    for pkg in args.packages:
        p = profile_package(pkg, args.batch, args.iterations, args.threads)
        p["label"] = f"{os.path.basename(os.path.normpath(pkg))}"
        profiles.append(p)
    print(format_profiles(profiles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
