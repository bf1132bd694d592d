"""What this machine can do: measured peak arithmetic rate per precision, and
the arithmetic cost of a model.

Peak rates (GFLOP/s; for int8 "GOP/s", one multiply-add = 2 ops):

- fp32 GEMM: numpy and torch matmul of large square float32 matrices
  (MKL / oneDNN, all cores); the best of several runs.
- bf16 GEMM: torch matmul in bfloat16. On a CPU without avx512_bf16/AMX this
  is emulated and slow; it is reported as measured, not as a hardware limit.
- OpenVINO convolution: a stack of 3x3 convolutions shaped like IResNet's
  third stage (256 channels, 14x14, batch 16), compiled by the OpenVINO CPU
  plugin in f32, with the bf16 precision hint, and in int8 (FakeQuantize on
  activations and weights, which OpenVINO's low-precision transformations turn
  into u8 x i8 convolutions - the same path an NNCF int8 model takes). The
  precision each convolution *executed* in is read back from the runtime model.
  This is the honest int8 peak for our purpose: the kernel the int8 packages
  actually use, on the layer shape that dominates the network's cost.
  (torch._int_mm is not used: on CPU it is a slow reference kernel, ~1 GOP/s.)

The "machine limit" per precision is the best measured rate in that
precision. Share of the limit = model GFLOPs x images/s / limit.

Model cost: multiply-accumulates of every convolution and linear layer of the
real architecture, counted with forward hooks on a 112x112 input (elementwise
BN / PReLU / add are ignored: under 1% of the work). FLOPs = 2 x MACs.

Run alone: ``python benchmarks/machine_peak.py [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def model_macs(arch: str) -> int:
    """Multiply-accumulates of one 112x112 image through ``arch`` (conv + linear layers)."""
    import torch

    from arcdeploy.backbones import build_model

    model = build_model(arch).eval()
    total = 0

    def conv_hook(mod, inp, out):
        nonlocal total
        kh, kw = mod.kernel_size
        total += out.numel() * (mod.in_channels // mod.groups) * kh * kw

    def linear_hook(mod, inp, out):
        nonlocal total
        total += out.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, torch.nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, 112, 112))
    for h in handles:
        h.remove()
    return total


def _best_rate(fn, ops: float, seconds: float, min_runs: int = 3) -> float:
    """Best ops/s of ``fn`` over runs lasting about ``seconds`` in total (after one warm-up)."""
    from arcdeploy.engines.base import StopRule, time_calls

    lat_ms, _ = time_calls(fn, 1, StopRule(None, seconds, min_runs))
    return ops / (min(lat_ms) / 1e3)


def gemm_rates(n: int = 2048, seconds: float = 2.0) -> dict:
    import torch

    ops = 2.0 * n**3
    out = {}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    out[f"fp32 numpy matmul {n}x{n}"] = _best_rate(lambda: a @ a, ops, seconds)
    t = torch.from_numpy(a)
    out[f"fp32 torch matmul {n}x{n}"] = _best_rate(lambda: t @ t, ops, seconds)
    # bf16: small size, it may be emulated (very slow without bf16 hardware)
    nb = 512
    tb = torch.randn(nb, nb).to(torch.bfloat16)
    out[f"bf16 torch matmul {nb}x{nb}"] = _best_rate(lambda: tb @ tb, 2.0 * nb**3, seconds / 2, min_runs=2)
    return {k: v / 1e9 for k, v in out.items()}


def _conv_stack_model(int8: bool, batch: int, channels: int, size: int, depth: int):
    """``depth`` 3x3 convolutions (+ PReLU-like leaky ReLU); int8: FakeQuantize before each conv."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([batch, channels, size, size], np.float32, name="input")
    h = x
    for _ in range(depth):
        w = (rng.standard_normal((channels, channels, 3, 3)) * (1.0 / np.sqrt(9 * channels))).astype(np.float32)
        wnode = ops.constant(w)
        if int8:
            # activations: asymmetric u8 range; weights: symmetric per-output-channel i8 (levels 255), as NNCF does
            lo, hi = np.float32(-4.0), np.float32(4.0)
            h = ops.fake_quantize(h, lo, hi, lo, hi, 256)
            wmax = np.abs(w).reshape(channels, -1).max(axis=1).reshape(channels, 1, 1, 1).astype(np.float32)
            wnode = ops.fake_quantize(wnode, -wmax, wmax, -wmax, wmax, 255)
        h = ops.convolution(h, wnode, [1, 1], [1, 1], [1, 1], [1, 1])
        slope = ops.constant(np.full((1, channels, 1, 1), 0.25, np.float32))
        h = ops.prelu(h, slope)
    return ov.Model([h], [x], f"conv_stack_{'int8' if int8 else 'fp32'}")


def openvino_conv_rates(
    batch: int = 16, channels: int = 256, size: int = 14, depth: int = 8, seconds: float = 3.0
) -> dict:
    """GFLOP/s (GOP/s) of OpenVINO's 3x3 convolutions in f32, bf16-hint and int8, and what each executed in."""
    import openvino as ov

    macs = batch * depth * channels * channels * 9 * size * size
    core = ov.Core()
    x = np.random.default_rng(1).standard_normal((batch, channels, size, size)).astype(np.float32)
    out = {}
    for label, int8, hint in (("fp32", False, "f32"), ("bf16", False, "bf16"), ("int8", True, "f32")):
        try:
            cm = core.compile_model(
                _conv_stack_model(int8, batch, channels, size, depth),
                "CPU",
                {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint},
            )
        except Exception as exc:  # a hint this CPU refuses
            out[label] = {"gflops": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}
            continue
        executed = sorted(
            {
                op.get_rt_info()["runtimePrecision"].astype(str)
                for op in cm.get_runtime_model().get_ops()
                if "layerType" in op.get_rt_info() and op.get_rt_info()["layerType"].astype(str) == "Convolution"
            }
        )
        req = cm.create_infer_request()
        rate = _best_rate(lambda req=req: req.infer({0: x}), 2.0 * macs, seconds)
        out[label] = {
            "gflops": rate / 1e9,
            "executed": executed,
            "inference_precision": str(cm.get_property("INFERENCE_PRECISION_HINT")),
        }
    return out


def machine_limits(quick: bool = False) -> dict:
    """{"fp32": GFLOP/s, "bf16": ..., "int8": GOP/s, "detail": {...}}: the best measured rate per precision."""
    seconds = 1.0 if quick else 2.5
    gemm = gemm_rates(1536 if quick else 2048, seconds)
    conv = openvino_conv_rates(seconds=seconds)
    # a rate counts for the precision it *executed* in (a bf16 hint that ran f32 is an f32 rate)
    executed = {"f32": "fp32", "bf16": "bf16", "u8": "int8", "i8": "int8"}
    by_prec: dict[str, list[float]] = {"fp32": [], "bf16": [], "int8": []}
    for k, v in gemm.items():
        by_prec[k.split()[0]].append(v)
    for v in conv.values():
        if v.get("gflops"):
            for e in v["executed"]:
                by_prec.setdefault(executed.get(e, e), []).append(v["gflops"])
    limits = {k: (max(v) if v else None) for k, v in by_prec.items()}
    return {**limits, "detail": {"gemm_gflops": gemm, "openvino_conv": conv}}


def _all_flags() -> list[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def cpu_features(flags) -> dict:
    """What the flags give the kernels that matter here (int8 dot products, bf16, f16, AMX)."""
    f = set(flags)
    return {
        "avx2": "avx2" in f,
        "fma": "fma" in f,
        "avx512": sorted(x for x in f if x in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd")),
        "vnni": sorted(f & {"avx512_vnni", "avx_vnni"}),
        "avx512_bf16": "avx512_bf16" in f,
        "avx512_fp16": "avx512_fp16" in f,
        "amx": sorted(f & {"amx_tile", "amx_int8", "amx_bf16", "amx_fp16"}),
    }


def _join(items: list[str], word: str = "and") -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + f" {word} " + items[-1]


def _none_of(items: list[str]) -> str:
    if len(items) == 1:
        return f"no {items[0]}"
    if len(items) == 2:
        return f"neither {items[0]} nor {items[1]}"
    return "none of " + _join(items, "or")


def describe_cpu(flags) -> str:
    """Sentences about this CPU's vector features and what they mean for int8 / bf16 / f16 kernels,
    every one of them derived from ``flags`` (never a claim the flags do not support)."""
    c = cpu_features(flags)
    has, lacks = [], []
    if c["avx2"]:
        has.append("AVX2" + (" + FMA" if c["fma"] else ""))
    else:
        lacks.append("AVX2")
    if c["avx512"]:
        has.append(f"AVX-512 ({', '.join(c['avx512'])})")
    else:
        lacks.append("AVX-512")
    if c["vnni"]:
        has.append(" and ".join({"avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI"}[v] for v in c["vnni"]))
    else:
        lacks.append("VNNI")
    (has if c["avx512_bf16"] else lacks).append("AVX512_BF16")
    (has if c["avx512_fp16"] else lacks).append("AVX512_FP16")
    if c["amx"]:
        has.append(f"AMX ({', '.join(c['amx'])})")
    else:
        lacks.append("AMX")
    text = f"This CPU has {_join(has) if has else 'none of the vector extensions listed here'}"
    text += f"; it has {_none_of(lacks)}." if lacks else "."
    if "amx_int8" in c["amx"]:
        text += " int8 convolutions can use AMX tiles (amx_int8)."
    elif c["vnni"]:
        text += (
            " int8 convolutions can use VNNI: one instruction (vpdpbusd) multiplies u8 activations by s8 weights "
            "and accumulates in int32, so int8 gets full 8-bit weights (no overflow fix)."
        )
    elif c["avx2"]:
        text += (
            " Without VNNI an int8 dot product takes three AVX2 instructions (vpmaddubsw, vpmaddwd, vpaddd) and "
            "the int16 intermediate can saturate, so the int8 recipe uses 7-bit weights."
        )
    bf16 = c["avx512_bf16"] or "amx_bf16" in c["amx"]
    if "amx_bf16" in c["amx"]:
        text += " bf16 layers can use AMX tiles (amx_bf16)."
    elif c["avx512_bf16"]:
        text += (
            " bf16 layers use AVX512_BF16 dot products (vdpbf16ps); on such a CPU OpenVINO's CPU plugin runs "
            "float layers in bf16 unless told f32 (arcdeploy's fp32 packages and the float layers of its int8 "
            "packages ask for f32)."
        )
    else:
        text += " There is no bf16 arithmetic: a bf16 hint executes in f32 and torch's bf16 matmul is emulated."
    if not c["avx512_fp16"] and "amx_fp16" not in c["amx"]:
        text += f" There is no f16 arithmetic: an f16 hint executes in {'bf16 or f32' if bf16 else 'f32'}."
    return text


def describe_limits(limits: dict) -> str:
    """The measured precision ratios, as facts from a :func:`machine_limits` result."""
    fp32, int8, bf16 = limits.get("fp32"), limits.get("int8"), limits.get("bf16")
    detail = limits.get("detail") or {}
    probes: dict[str, list[tuple[float, str]]] = {"fp32": [], "bf16": [], "int8": []}
    for d in (detail, limits.get("detail_again") or {}):
        for name, rate in (d.get("gemm_gflops") or {}).items():
            probes.setdefault(name.split()[0], []).append((rate, name))
        executed = {"f32": "fp32", "bf16": "bf16", "u8": "int8", "i8": "int8"}
        for hint, v in (d.get("openvino_conv") or {}).items():
            for e in v.get("executed") or []:
                if v.get("gflops"):
                    probes.setdefault(executed.get(e, e), []).append(
                        (v["gflops"], f"OpenVINO {hint}-hint convolution, executed {e}")
                    )
    raised = limits.get("raised_by_runner") or {}

    def source(prec: str) -> str:
        if prec in raised:
            return "the fastest package measured"
        best = max(probes.get(prec) or [(0.0, "?")])
        return best[1]

    parts = []
    if fp32:
        parts.append(f"fp32 {fp32:.0f} GFLOP/s ({source('fp32')})")
    if fp32 and int8:
        parts.append(f"int8 {int8:.0f} GOP/s = {int8 / fp32:.1f}x fp32 ({source('int8')})")
    if fp32 and bf16:
        parts.append(f"bf16 {bf16:.0f} GFLOP/s = {bf16 / fp32:.1f}x fp32 ({source('bf16')})")
    return ("Measured limits on this machine: " + "; ".join(parts) + ".") if parts else ""


def cpu_summary() -> dict:
    from arcdeploy.bench import machine_info

    info = machine_info()
    mhz = None
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("cpu MHz"):
                mhz = float(line.split(":")[1])
                break
    except OSError:
        pass
    info["mhz"] = mhz
    info["all_flags"] = _all_flags()
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    # nominal fp32 peak with two 256-bit FMA pipes: 2 x 8 lanes x 2 flops per cycle per core, at the
    # clock /proc/cpuinfo reports, assuming every logical CPU is a whole core (cores with two full
    # 512-bit FMA pipes reach twice this; the measured rates are what the shares use)
    if mhz and "fma" in info["flags"] and "avx2" in info["flags"]:
        info["nominal_fp32_gflops"] = info["logical_cpus"] * 32 * mhz / 1e3
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--archs", default="r18,r50,r100")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    cpu = cpu_summary()
    print(
        f"CPU: {cpu['cpu']}  {cpu['logical_cpus']} logical CPUs  {cpu['mhz']} MHz  flags: {' '.join(cpu['flags'])}"
        + (
            f"  nominal fp32 peak (two 256-bit FMA pipes per core) {cpu['nominal_fp32_gflops']:.0f} GFLOP/s"
            if cpu.get("nominal_fp32_gflops")
            else ""
        )
    )
    print(describe_cpu(cpu["all_flags"]))
    for arch in args.archs.split(","):
        macs = model_macs(arch)
        print(f"{arch:>5}: {macs / 1e9:.3f} GMACs = {2 * macs / 1e9:.3f} GFLOPs per 112x112 image")
    lim = machine_limits(args.quick)
    for k, v in lim["detail"]["gemm_gflops"].items():
        print(f"  {k:<22} {v:8.1f} GFLOP/s")
    for k, v in lim["detail"]["openvino_conv"].items():
        if v.get("gflops") is None:
            print(f"  OpenVINO conv {k:<8} failed: {v['error']}")
        else:
            print(
                f"  OpenVINO conv {k:<8} {v['gflops']:8.1f} G(FL)OP/s  executed {','.join(v['executed'])} "
                f"(inference precision {v['inference_precision']})"
            )
    print(
        "limits: "
        + ", ".join(f"{k} {lim[k]:.1f}" if lim.get(k) else f"{k} -" for k in ("fp32", "bf16", "int8"))
        + " G(FL)OP/s"
    )
    print(describe_limits(lim))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu, "limits": lim}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
