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


def profile_package(pkg_dir, batch: int = 16, iterations: int = 2, threads: int | None = None) -> dict:
    """{"by_type": {type: ms per batch}, "by_exec": {(type, exec_type): ms}, "total_ms": ...},
    averaged over iterations."""
    from arcdeploy.bench import timing_faces
    from arcdeploy.package import load

    pkg = load(pkg_dir, threads=threads)
    x = pkg.to_model_input(timing_faces(batch))
    profile = pkg.runtime.layer_profile(x, iterations)
    return {
        "package": str(pkg_dir),
        "precision": pkg.manifest.precision,
        "batch": batch,
        "iterations": iterations,
        **profile,
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
