"""arcdeploy against what users would run instead, side by side, on one checkpoint.

Peers (what a user of the checkpoint does without arcdeploy):
- "PyTorch eager fp32": arcface_torch's own inference - the backbone in
  ``model.eval()`` under ``torch.no_grad()``, torch's default threads.
- "ONNX Runtime default fp32": what insightface's python package does -
  ``ort.InferenceSession(model.onnx, providers=["CPUExecutionProvider"])``
  with default session options, on the exported ONNX.
arcdeploy: packages built by ``arcdeploy.build`` (OpenVINO fp32 / bf16 /
int8, ONNX Runtime fp32 / int8 by default; int8 with the default recipe, without
the accuracy-aware fallback unless ``--fallback``); a combination that fails to
build or load is a row with its error.

Checkpoints are generated (``arcdeploy.demo.synth.write_generated_checkpoint``):
the real architecture with untrained weights. Speed does not depend on the
weights' values (BN statistics are fitted, PReLU slopes normal, no denormals),
so the timings carry over to a trained checkpoint; the cosine column is
against fp32 PyTorch on the same synthetic faces.

Measurement: every runner is loaded once; then for each batch size, R rounds,
each round running every runner in turn (the order rotates each round, so no
runner always follows the same neighbour): one warm-up run per runner and batch
size (first round only), then timed runs
for at least ``--seconds`` and ``--min-runs``. Reported: the median over
rounds of the round's throughput (images/s) and of the round's p50 latency.
All runners see the same input (synthetic aligned faces, already in each
runner's input format: model time only, as in ``arcdeploy bench``).

Machine limit (``machine_peak.py``): best measured rate of this machine per
precision; share = model GFLOPs (2 x conv/linear MACs, computed from the
architecture) x images/s / limit of the precision the runner *executed* in.

    python benchmarks/compare_peers.py --archs r50,r100 --batches 1,16 [--quick] [--streams] [--profile]
                                       [--json FILE]          (default benchmarks/results/peers.json)
    python benchmarks/compare_peers.py --render FILE          (the markdown of a saved report)

``benchmarks/write_results.py`` puts it into RESULTS.md with the other sections.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import gc
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

DEFAULT_COMBOS = "openvino:fp32,openvino:bf16,openvino:int8,onnxruntime:fp32,onnxruntime:int8"
REFERENCE = "ONNX Runtime default fp32"
DEFAULT_JSON = HERE / "results" / "peers.json"
# int8 calibration: 300 generated aligned faces (+ 64 held out for the build's fidelity check)
CALIB_COUNT = 364


@dataclass
class Runner:
    name: str
    kind: str  # "peer" or "arcdeploy"
    precision: str  # what was asked
    executed: str = "fp32"  # what the heavy layers executed in (for the machine limit)
    fn: object = None  # fn(x) for x in this runner's input format
    fmt: object = None  # the package's InputSpec (None: float32 NCHW normalised)
    error: str | None = None
    load_s: float | None = None
    build_s: float | None = None
    cosine: dict | None = None
    manifest_fidelity: object = None
    info: dict = field(default_factory=dict)
    rounds: dict = field(default_factory=dict)  # batch -> list of (throughput, p50, latencies)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _faces(n: int) -> np.ndarray:
    from arcdeploy.synthetic import aligned_faces

    base = aligned_faces(min(n, 16), seed=11)
    return np.ascontiguousarray(np.tile(base, (-(-n // base.shape[0]), 1, 1, 1))[:n])


def _prepare_checkpoint(workdir: Path, arch: str, log) -> tuple[Path, Path]:
    from arcdeploy.demo.synth import write_generated_checkpoint
    from arcdeploy.exporter import export

    d = workdir / arch
    ckpt = d / "backbone.pth"
    if not ckpt.exists():
        log(f"[{arch}] writing generated (untrained) checkpoint {ckpt}")
        write_generated_checkpoint(ckpt, arch)
    exp = d / "export"
    if not (exp / "manifest.json").exists():
        log(f"[{arch}] exporting")
        export(ckpt, exp, force=True)
    return ckpt, exp


def calibration_faces(workdir: Path, n: int = CALIB_COUNT) -> np.ndarray:
    """Synthetic aligned faces for int8 calibration (and the build's held-out fidelity check), cached."""
    from arcdeploy.synthetic import aligned_faces

    path = workdir / f"calib_faces_{n}.npy"
    if path.exists():
        return np.load(path)
    faces = aligned_faces(n, seed=21, identities=n // 4)
    np.save(path, faces)
    return faces


def _package(
    workdir: Path, arch: str, exp: Path, engine: str, precision: str, rebuild: bool, log, fallback: bool = False
):
    """Build (or reuse) a package; returns (path, build seconds or None when reused). int8 is built
    without the accuracy-aware fallback unless ``fallback``: on untrained weights it would keep layers
    in float that a trained network does not need, and the comparison is about speed. Built through
    the API (``arcdeploy.build``), which checks fidelity on generated faces when no images are given."""
    from arcdeploy import build

    out = workdir / arch / f"pkg_{engine}_{precision}"
    src_sha = json.loads((exp / "manifest.json").read_text())["source"]["sha256"]
    if (out / "manifest.json").exists() and not rebuild:
        m = json.loads((out / "manifest.json").read_text())
        if m.get("source", {}).get("sha256") == src_sha and m.get("precision") == precision:
            return out, None
    log(f"[{arch}] building {engine} {precision} -> {out}")
    t = time.perf_counter()
    calib = calibration_faces(workdir) if precision == "int8" else None
    build(exp, out, engine=engine, precision=precision, calib=calib, force=True, fallback=fallback)
    return out, time.perf_counter() - t


def _executed_precision(desc: dict, asked: str) -> str:
    """The precision the convolutions ran in, from the engine's description."""
    ex = (desc or {}).get("executed") or {}
    convs = (ex.get("layers") or {}).get("Convolution") or {}
    if convs:
        top = max(convs, key=convs.get)
        return {"u8": "int8", "i8": "int8", "bf16": "bf16", "f16": "fp16", "f32": "fp32"}.get(top, top)
    return asked


def _streams_runner(base: Runner, path: Path) -> Runner:
    """The same OpenVINO package compiled for throughput: a batch is split across the plugin's
    streams (one infer request each, run at once); its latency is that of the whole batch."""
    from arcdeploy.package import load

    r = Runner(
        f"{base.name} (throughput streams)",
        "arcdeploy",
        base.precision,
        executed=base.executed,
        fmt=base.fmt,
        manifest_fidelity=base.manifest_fidelity,
    )
    t = time.perf_counter()
    eng = load(path, performance_hint="THROUGHPUT").runtime
    r.load_s = time.perf_counter() - t
    r.info.update(_info(eng.describe()))
    r.info["package"] = str(path)
    jobs = eng.optimal_in_flight()

    def run(x, eng=eng, jobs=jobs):
        parts = [p for p in np.array_split(x, min(jobs, x.shape[0])) if p.shape[0]]
        return np.concatenate(eng.infer_many(parts)) if len(parts) > 1 else eng.infer(x)

    r.fn = run
    return r


def make_runners(
    arch: str,
    ckpt: Path,
    exp: Path,
    workdir: Path,
    combos,
    rebuild: bool,
    log,
    streams: bool = False,
    fallback: bool = False,
) -> list[Runner]:
    import onnxruntime as ort
    import torch

    from arcdeploy.package import load
    from arcdeploy.sources.checkpoint import load_backbone

    runners = []
    t = time.perf_counter()
    model, _ = load_backbone(ckpt, arch)
    model.eval()

    def torch_fn(x, model=model):
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    runners.append(
        Runner(
            "PyTorch eager fp32",
            "peer",
            "fp32",
            fn=torch_fn,
            load_s=time.perf_counter() - t,
            info={"threads": torch.get_num_threads(), "version": torch.__version__},
        )
    )
    t = time.perf_counter()
    sess = ort.InferenceSession(str(exp / "model.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    runners.append(
        Runner(
            REFERENCE,
            "peer",
            "fp32",
            fn=lambda x, s=sess, n=name: s.run(None, {n: x})[0],
            load_s=time.perf_counter() - t,
            info={"version": ort.__version__},
        )
    )
    for engine, precision in combos:
        r = Runner(f"arcdeploy {engine} {precision}", "arcdeploy", precision)
        try:
            path, r.build_s = _package(workdir, arch, exp, engine, precision, rebuild, log, fallback)
            t = time.perf_counter()
            pkg = load(path)
            eng = pkg.runtime
            r.load_s = time.perf_counter() - t
            if pkg.fixed_batch:
                r.info["fixed_batch"] = pkg.fixed_batch
            r.fmt = pkg.input_spec
            r.fn = (lambda x, e=eng: e.infer(x)) if not pkg.fixed_batch else None
            r.info.update(_info(pkg.describe()))
            r.executed = _executed_precision(r.info, precision)
            r.manifest_fidelity = pkg.manifest.fidelity.to_json() if pkg.manifest.fidelity else None
            r.info["package"] = str(path)
            r.info["package_built"] = dt.datetime.fromtimestamp(
                (path / "manifest.json").stat().st_mtime, dt.UTC
            ).strftime("%Y-%m-%d %H:%M UTC")
            if r.fn is None:
                faces_fn = pkg.infer
                r.fn = ("faces", faces_fn)
        except Exception as exc:  # reported as a row, never a crash
            r.error = _one_line(exc)
            log(f"[{arch}] {r.name}: {r.error}")
            if os.environ.get("ARCDEPLOY_DEBUG"):
                traceback.print_exc()
        runners.append(r)
        if streams and engine == "openvino" and not r.error and not r.info.get("fixed_batch"):
            try:
                runners.append(_streams_runner(r, Path(r.info["package"])))
            except Exception as exc:
                runners.append(Runner(f"{r.name} (throughput streams)", "arcdeploy", precision, error=_one_line(exc)))
    return runners


def _call(r: Runner, faces: np.ndarray, prepared: dict) -> np.ndarray:
    if isinstance(r.fn, tuple):  # a fixed-batch package: Package.infer pads / splits
        return r.fn[1](faces)
    return r.fn(prepared[r.fmt])


def _prepare(faces: np.ndarray, runners: list[Runner]) -> dict:
    from arcdeploy.manifest import InputSpec

    out = {None: InputSpec().to_model_input(faces)}
    for r in runners:
        if r.fmt is not None:
            out[r.fmt] = r.fmt.to_model_input(faces)
    return out


def _info(info) -> dict:
    """A RuntimeInfo as one flat dict (its engine-specific details beside the common keys)."""
    d = info.to_json()
    return {**{k: v for k, v in d.items() if k != "details"}, **d.get("details", {})}


def fidelity(runners: list[Runner], n: int = 16) -> None:
    """Per-image cosine of every runner to fp32 PyTorch eager on the same faces."""
    faces = _faces(n)
    ok = [r for r in runners if not r.error]
    prepared = _prepare(faces, ok)
    ref = _call(ok[0], faces, prepared).astype(np.float64)
    for r in ok:
        try:
            out = np.asarray(_call(r, faces, prepared), dtype=np.float64)
            cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1))
            r.cosine = {"mean": float(cos.mean()), "min": float(cos.min()), "n": n}
        except Exception as exc:
            r.error = _one_line(exc)


def measure(runners: list[Runner], batches, rounds: int, seconds: float, min_runs: int, log) -> None:
    from arcdeploy.engines.base import StopRule, time_calls

    ok = [r for r in runners if not r.error]
    for b in batches:
        faces = _faces(b)
        prepared = _prepare(faces, ok)
        for rnd in range(rounds):
            order = ok[rnd % len(ok) :] + ok[: rnd % len(ok)]
            for r in order:
                try:
                    if rnd == 0:  # one warm-up per runner and batch size (first runs do one-time work)
                        _call(r, faces, prepared)
                    lat, wall = time_calls(
                        functools.partial(_call, r, faces, prepared), 0, StopRule(None, seconds, min_runs)
                    )
                    r.rounds.setdefault(b, []).append((b * len(lat) / wall, float(np.median(lat)), lat))
                except Exception as exc:
                    r.error = _one_line(exc)
                    log(f"  {r.name}: {r.error}")
            log(
                f"  batch {b} round {rnd + 1}/{rounds}: "
                + ", ".join(
                    f"{r.name.replace('arcdeploy ', '')} {r.rounds[b][-1][0]:.1f}/s" for r in ok if r.rounds.get(b)
                )
            )


def summarize(arch: str, runners: list[Runner], batches, macs: int, limits: dict) -> list[dict]:
    rows = []
    ref = next((r for r in runners if r.name == REFERENCE), None)
    for b in batches:
        ref_tp = float(np.median([x[0] for x in ref.rounds[b]])) if ref and ref.rounds.get(b) else None
        for r in runners:
            row = {
                "arch": arch,
                "batch": b,
                "runner": r.name,
                "kind": r.kind,
                "precision": r.precision,
                "executed": r.executed,
                "error": r.error,
                "load_s": r.load_s,
                "build_s": r.build_s,
                "cosine": r.cosine,
                "manifest_fidelity": r.manifest_fidelity,
                "threads": r.info.get("threads"),
                "streams": r.info.get("streams"),
            }
            rs = r.rounds.get(b)
            if rs and not r.error:
                tp = float(np.median([x[0] for x in rs]))
                p50 = float(np.median([x[1] for x in rs]))
                pooled = np.concatenate([x[2] for x in rs])
                gflops = 2 * macs * tp / 1e9
                lim = limits.get(r.executed) or limits.get("fp32")
                row.update(
                    {
                        "throughput": tp,
                        "p50_ms": p50,
                        "throughput_rounds": [x[0] for x in rs],
                        "latency_ms": {
                            "mean": float(pooled.mean()),
                            "p90": float(np.percentile(pooled, 90)),
                            "p99": float(np.percentile(pooled, 99)),
                            "runs": int(pooled.size),
                        },
                        "ratio_vs_ort_fp32": tp / ref_tp if ref_tp else None,
                        "achieved_gflops": gflops,
                        "limit_gflops": lim,
                        "share_of_limit": gflops / lim if lim else None,
                    }
                )
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    head = (
        "| arch | batch | runner | executed | img/s | p50 ms | x ORT fp32 | cos vs PyTorch fp32 (mean / min) "
        "| build check cos min | GFLOP/s | share of limit |"
    )
    lines = [head, "|---|---:|---|---|---:|---:|---:|---|---|---:|---:|"]
    for r in rows:
        if r.get("throughput") is None:
            lines.append(
                f"| {r['arch']} | {r['batch']} | {r['runner']} | - | error: {r['error'] or 'not measured'} "
                "| | | | | | |"
            )
            continue
        cos = f"{r['cosine']['mean']:.5f} / {r['cosine']['min']:.5f}" if r.get("cosine") else "-"
        ratio = f"{r['ratio_vs_ort_fp32']:.2f}" if r.get("ratio_vs_ort_fp32") else "-"
        share = f"{100 * r['share_of_limit']:.0f}% of {r['limit_gflops']:.0f}" if r.get("share_of_limit") else "-"
        mf = r.get("manifest_fidelity") or {}
        mcos = mf.get("cosine") if isinstance(mf, dict) else None
        build_cos = f"{mcos['min']:.5f} (n={mcos.get('n')})" if isinstance(mcos, dict) and "min" in mcos else "-"
        lines.append(
            f"| {r['arch']} | {r['batch']} | {r['runner']} | {r['executed']} | {r['throughput']:.2f} "
            f"| {r['p50_ms']:.1f} | {ratio} | {cos} | {build_cos} | {r['achieved_gflops']:.1f} | {share} |"
        )
    return "\n".join(lines)


def ceilings(rows: list[dict], limits: dict) -> dict | None:
    """Facts about the largest measured network at its largest batch: how close ONNX Runtime fp32 already
    runs to this machine's fp32 limit, and how far each precision's best arcdeploy runner could go."""
    measured = [r for r in rows if r.get("throughput")]
    if not measured:
        return None
    arch = "r100" if any(r["arch"] == "r100" for r in measured) else measured[-1]["arch"]
    batch = max(r["batch"] for r in measured if r["arch"] == arch)
    at = [r for r in measured if r["arch"] == arch and r["batch"] == batch]
    ref = next((r for r in at if r["runner"] == REFERENCE), None)
    if not ref or not ref.get("achieved_gflops"):
        return None
    out = {"arch": arch, "batch": batch, "reference_share": ref.get("share_of_limit"), "by_executed": {}}
    for prec in ("fp32", "bf16", "int8"):
        cands = [r for r in at if r["kind"] == "arcdeploy" and r["executed"] == prec]
        if not cands or not limits.get(prec):
            continue
        best = max(cands, key=lambda r: r["throughput"])
        out["by_executed"][prec] = {
            "runner": best["runner"],
            "ratio_vs_ort_fp32": best["ratio_vs_ort_fp32"],
            "share_of_limit": best["share_of_limit"],
            "ceiling_ratio": limits[prec] / ref["achieved_gflops"],
        }
    return out


def ceilings_paragraph(c: dict | None, profiles: list[dict]) -> str:
    if not c:
        return ""
    text = f"At {c['arch']}, batch {c['batch']}: "
    if c.get("reference_share"):
        text += (
            f"the ONNX Runtime fp32 session already runs at {100 * c['reference_share']:.0f}% of this machine's "
            f"measured fp32 limit, so an fp32 build can be at most {1 / c['reference_share']:.2f}x faster than it."
        )
    for prec, v in c["by_executed"].items():
        text += (
            f" Best runner executing {prec}: {v['runner']}, {v['ratio_vs_ort_fp32']:.2f}x ONNX Runtime fp32, "
            f"{100 * v['share_of_limit']:.0f}% of the measured {prec} limit (at 100% it would be "
            f"{v['ceiling_ratio']:.2f}x)."
        )
    shares = [p["by_type"].get("Convolution", 0.0) / p["total_ms"] for p in profiles or [] if p.get("total_ms")]
    if shares:
        text += (
            f" Convolutions take {100 * min(shares):.0f}% or more of the OpenVINO packages' layer time (per-layer "
            "counters below), so the convolution kernels' rate is what bounds these ratios."
        )
    return text


def peers_markdown(report: dict, level: int = 2, machine: bool = True) -> str:
    """The comparison as markdown: method, table, this machine's measured limits, what bounds the ratios,
    the per-layer profile. Every statement about the machine comes from the report's measured CPU flags
    and limits; ``machine=False`` leaves the CPU description to the caller."""
    from machine_peak import describe_cpu, describe_limits
    from profile_layers import format_profiles

    h = "#" * level
    cpu = report["cpu"]
    lim = report["limits"]
    conv = lim["detail"]["openvino_conv"]
    gemm = lim["detail"]["gemm_gflops"]
    flags = cpu.get("all_flags") or cpu.get("flags") or []
    profiles = list({p["package"]: p for p in report.get("profiles") or []}.values())
    vers = report.get("versions") or {}
    fallback = report.get("int8_fallback", False)
    lines = [f"Date: {report['date']}  ", f"Command: `{report['command']}`  "]
    if machine:
        lines.append(
            f"CPU: {cpu['cpu']}, {cpu['logical_cpus']} logical CPUs, {cpu.get('mhz')} MHz; "
            f"flags: {' '.join(cpu['flags']) or '-'}  "
        )
    if vers:
        lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    lines.append("")
    if machine:
        lines += [describe_cpu(flags), ""]
    lines += [
        "Checkpoints: generated by `arcdeploy.demo.synth.write_generated_checkpoint` - the real IResNet "
        "architecture with UNTRAINED weights (BN statistics fitted on synthetic faces). Speed does not "
        "depend on the weights' values, so the timings hold for trained checkpoints; the cosine column "
        "compares each runner with fp32 PyTorch on the same 16 synthetic faces, and `build check cos min` is "
        "the fidelity the build recorded in the package's manifest (64 held-out generated faces). These "
        "fidelity figures say nothing about a trained network's (see the real-model tables). int8 packages: "
        + (
            "the default recipe with the accuracy-aware fallback."
            if fallback
            else "the default recipe without the accuracy-aware fallback (on untrained weights the fallback "
            "would keep layers in float that a trained network does not need; `--fallback` builds with it)."
        ),
        "",
        "Method: all runners loaded at once; per batch size, rounds in which every runner runs in turn "
        f"(order rotated each round; {report['rounds']} rounds, >= {report['seconds']} s and >= "
        f"{report['min_runs']} timed runs per runner per round, one untimed warm-up run per runner and batch "
        "size in the first round); reported: the median over rounds of throughput and of p50 latency. Model "
        "time only (input already in each runner's format). Shared machine: single numbers are noisy (the "
        "per-round throughputs are in the JSON); load average (1, 5, 15 min) at the start "
        + " / ".join(f"{x:.1f}" for x in report["load_average"]["start"])
        + ", at the end "
        + " / ".join(f"{x:.1f}" for x in report["load_average"].get("end", []))
        + f" on {cpu['logical_cpus']} CPUs. Every runner uses its library's default threads; with more runnable "
        "jobs than cores, OpenMP-based PyTorch is hurt most (its threads wait for each other at every layer), "
        "so its column is the least stable.",
        "",
        f"{h} Results",
        "",
        format_table(report["rows"]),
        "",
        "`x ORT fp32`: throughput / throughput of the ONNX Runtime default session at the same batch. "
        "`executed`: the precision OpenVINO reports for the convolutions (the others: what the graph says). "
        "`GFLOP/s`: model FLOPs (2 x MACs of every conv and linear layer, computed from the architecture: "
        + ", ".join(f"{a} {2 * m / 1e9:.2f} GFLOPs" for a, m in report["macs"].items())
        + " per image) x images/s. `share of limit`: that rate / the best rate measured on this machine "
        "in the precision the runner executed in (below).",
        "",
        f"{h} This machine's limits (measured)",
        "",
        "| kernel | rate | executed in |",
        "|---|---:|---|",
    ]
    for k, v in gemm.items():
        lines.append(f"| {k} | {v:.1f} GFLOP/s | {k.split()[0]} |")
    for k, v in conv.items():
        if v.get("gflops") is None:
            lines.append(f"| OpenVINO 3x3 conv stack, {k} | failed: {v['error']} | |")
        else:
            lines.append(
                f"| OpenVINO 3x3 conv stack 256ch 14x14 batch 16, {k} | {v['gflops']:.1f} G(FL)OP/s "
                f"| {','.join(v['executed'])} |"
            )
    again = lim.get("detail_again")
    if again:
        lines += [
            "",
            "Measured again after the runs (the limit is the higher of the two): "
            + ", ".join(
                [f"{k} {v:.1f}" for k, v in again["gemm_gflops"].items()]
                + [f"OpenVINO conv {k} {v['gflops']:.1f}" for k, v in again["openvino_conv"].items() if v.get("gflops")]
            ),
        ]
    lines.append("")
    if cpu.get("nominal_fp32_gflops"):
        lines += [
            f"Nominal fp32 peak at the reported clock if each logical CPU were a whole core with two 256-bit FMA "
            f"pipes: {cpu['nominal_fp32_gflops']:.0f} GFLOP/s (cores with two full 512-bit FMA pipes: twice "
            "that); the shares use the measured rates, not this figure.",
            "",
        ]
    lines += [
        "Limits used: "
        + ", ".join(f"{k} {lim[k]:.1f}" if lim.get(k) else f"{k} -" for k in ("fp32", "bf16", "int8"))
        + " G(FL)OP/s (int8: GOP/s)"
        + (
            " - raised to the best rate a runner reached for "
            + ", ".join(sorted(lim["raised_by_runner"]))
            + " (the probes run one request on all threads; a model split across streams beat them)"
            if lim.get("raised_by_runner")
            else ""
        )
        + ". "
        + describe_limits(lim)
        + " The int8 limit is OpenVINO's own u8 x i8 convolution (FakeQuantize model, as NNCF produces) on the "
        "layer shape that dominates IResNet, because that is the kernel the int8 packages use (torch._int_mm "
        "is a slow reference kernel on CPU and not a limit).",
        "",
    ]
    para = ceilings_paragraph(ceilings(report["rows"], lim), profiles)
    if para:
        lines += [f"{h} What bounds the ratios", "", para, ""]
    if profiles:
        lines += [
            f"{h} Where the time goes (OpenVINO per-layer counters, PERF_COUNT)",
            "",
            format_profiles(profiles) + profile_summary(profiles),
            "",
        ]
    if report.get("notes"):
        lines += [f"{h} Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def profile_summary(profiles: list[dict]) -> str:
    """One paragraph: how much of each package's time is convolution, and int8 vs fp32 convolution time."""
    by_prec = {p["precision"]: p for p in profiles}
    lines = [""]
    for p in profiles:
        conv = p["by_type"].get("Convolution", 0.0)
        kernels = sorted({k.split("[")[1].rstrip("]") for k in p["by_exec"] if k.startswith("Convolution [")})
        lines.append(
            f"- {p['label']}: convolutions are {100 * conv / p['total_ms']:.0f}% of the layer time "
            f"(kernels {', '.join(kernels)}); PReLU and most BatchNorms have no row of their own: "
            "OpenVINO fuses them into the convolutions (BNs it cannot fuse show as MulAdd, or in int8 "
            "are folded into FakeQuantize)."
        )
    f, q = by_prec.get("fp32"), by_prec.get("int8")
    if f and q and q["by_type"].get("Convolution"):
        fc, qc = f["by_type"].get("Convolution", 0.0), q["by_type"]["Convolution"]
        lines.append(
            f"- int8 convolutions take {qc:.0f} ms against {fc:.0f} ms in fp32 ({fc / qc:.2f}x faster); "
            f"the whole int8 model is {f['total_ms'] / q['total_ms']:.2f}x faster than fp32 by these counters, "
            "with the FakeQuantize (requantisation) layers and the float head taking the rest."
        )
    return "\n".join(lines)


def auto_notes(rows: list[dict], runners: list[Runner]) -> list[str]:
    """Provenance of the packages and fidelity worth a warning, for the results file."""
    notes = []
    built = sorted({r.info["package_built"] for r in runners if r.info.get("package_built")})
    if built:
        notes.append(
            f"Packages built by arcdeploy.build between {built[0]} and {built[-1]} (int8: calibrated "
            f"on {CALIB_COUNT - 64} generated aligned faces, 64 more held out for the build's fidelity check)."
        )
    seen = set()
    for r in rows:
        cos = r.get("cosine")
        if r["kind"] == "arcdeploy" and cos and cos["min"] < 0.95 and (r["arch"], r["runner"]) not in seen:
            seen.add((r["arch"], r["runner"]))
            notes.append(
                f"{r['arch']} {r['runner']}: low fidelity to fp32 on these untrained weights (min cosine "
                f"{cos['min']:.3f}); speed is unaffected, but judge int8 fidelity on a trained checkpoint."
            )
    return notes


def apply_observed_limits(rows: list[dict], limits: dict) -> dict:
    """Raise each precision's limit to the best rate any runner reached in it (the probes run one
    request on all threads; a model split across streams can beat them), and recompute the shares."""
    limits = dict(limits)
    observed = {}
    for r in rows:
        if r.get("achieved_gflops") and r.get("executed") in ("fp32", "bf16", "int8"):
            observed[r["executed"]] = max(observed.get(r["executed"], 0.0), r["achieved_gflops"])
    for k, v in observed.items():
        if not limits.get(k) or v > limits[k]:
            limits[k] = v
            limits.setdefault("raised_by_runner", {})[k] = v
    for r in rows:
        lim = limits.get(r.get("executed")) or limits.get("fp32")
        if r.get("achieved_gflops") and lim:
            r["limit_gflops"], r["share_of_limit"] = lim, r["achieved_gflops"] / lim
    return limits


def _limit_values(limits: dict) -> dict:
    return {k: limits.get(k) for k in ("fp32", "bf16", "int8")}


def merge_limits(a: dict, b: dict) -> dict:
    """Per precision, the higher of two limit measurements; both kept in the detail."""
    out = {k: max([v for v in (a.get(k), b.get(k)) if v] or [None]) for k in ("fp32", "bf16", "int8")}
    out["detail"] = a["detail"]
    out["detail_again"] = b["detail"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="arcdeploy vs. PyTorch eager and ONNX Runtime default, side by side.")
    ap.add_argument("--archs", default="r50,r100")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--combos", default=DEFAULT_COMBOS, help=f"engine:precision list (default {DEFAULT_COMBOS})")
    ap.add_argument("--rounds", type=int, default=None, help="measurement rounds (default 3; --quick 2)")
    ap.add_argument("--seconds", type=float, default=None, help="seconds per runner per round (default 4; --quick 1.5)")
    ap.add_argument("--min-runs", type=int, default=None, help="timed runs per runner per round (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="fewer rounds and shorter runs, quick machine-limit probe")
    ap.add_argument("--no-peak", action="store_true", help="skip measuring the machine limits")
    ap.add_argument(
        "--profile", action="store_true", help="per-layer counters of the r100 (or last arch) OpenVINO packages"
    )
    ap.add_argument("--profile-batch", type=int, default=None, help="batch for --profile (default: the largest)")
    ap.add_argument("--workdir", default="/tmp/arcdeploy-compare", help="checkpoints, exports and packages (reused)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild packages even if present")
    ap.add_argument("--json", default=str(DEFAULT_JSON), metavar="FILE", help=f"the report (default {DEFAULT_JSON})")
    ap.add_argument(
        "--fallback", action="store_true", help="build int8 with the accuracy-aware fallback (slow on untrained nets)"
    )
    ap.add_argument(
        "--streams",
        action="store_true",
        help="also run each OpenVINO package compiled for throughput, a batch split across its streams",
    )
    ap.add_argument(
        "--render",
        default=None,
        metavar="REPORT.json",
        help="only print the markdown of a saved report; measures nothing (write_results.py composes RESULTS.md)",
    )
    args = ap.parse_args(argv)

    if args.render:
        print(peers_markdown(json.loads(Path(args.render).read_text())))
        return 0

    from arcdeploy.bench import parse_batches
    from arcdeploy.utils import library_versions
    from machine_peak import cpu_summary, machine_limits, model_macs

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    batches = parse_batches(args.batches)
    combos = [tuple(c.split(":")) for c in args.combos.split(",") if c.strip()]
    rounds = args.rounds or (2 if args.quick else 3)
    seconds = args.seconds if args.seconds is not None else (1.5 if args.quick else 4.0)
    min_runs = args.min_runs or (1 if args.quick else 3)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    report = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/compare_peers.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "cpu": cpu_summary(),
        "rounds": rounds,
        "seconds": seconds,
        "min_runs": min_runs,
        "archs": archs,
        "batches": batches,
        "combos": [":".join(c) for c in combos],
        "notes": [],
        "load_average": {"start": list(os.getloadavg())},
        "versions": library_versions("arcdeploy", "torch", "onnxruntime", "openvino", "nncf", "numpy"),
        "int8_fallback": args.fallback,
    }
    if args.no_peak:
        limits = {"fp32": None, "bf16": None, "int8": None, "detail": {"gemm_gflops": {}, "openvino_conv": {}}}
    else:
        log("measuring this machine's limits ...")
        limits = machine_limits(quick=args.quick)
        log(
            "  "
            + ", ".join(f"{k} {limits[k]:.1f}" if limits.get(k) else f"{k} -" for k in ("fp32", "bf16", "int8"))
            + " G(FL)OP/s"
        )
    # a rate counts for the precision it executed in (machine_limits reads that back from OpenVINO)
    report["limits"] = limits
    report["macs"] = {a: model_macs(a) for a in archs}

    measured, profiles = [], []
    for arch in archs:
        ckpt, exp = _prepare_checkpoint(workdir, arch, log)
        runners = make_runners(
            arch, ckpt, exp, workdir, combos, args.rebuild, log, streams=args.streams, fallback=args.fallback
        )
        fidelity(runners)
        log(f"[{arch}] measuring {len([r for r in runners if not r.error])} runners at batches {batches}")
        measure(runners, batches, rounds, seconds, min_runs, log)
        measured.append((arch, runners))
        print(format_table(summarize(arch, runners, batches, report["macs"][arch], _limit_values(limits))), flush=True)
        if args.profile and (arch == "r100" or arch == archs[-1]) and not profiles:
            from profile_layers import profile_package

            pb = args.profile_batch or max(batches)
            for r in runners:
                if (
                    r.kind == "arcdeploy"
                    and not r.error
                    and r.info.get("engine") == "openvino"
                    and "streams" not in r.name
                ):  # same model and compiled settings as the latency runner
                    log(f"[{arch}] profiling {r.name} at batch {pb}")
                    try:
                        p = profile_package(r.info["package"], pb, iterations=1 if args.quick else 2)
                        p["label"] = f"{arch} {r.precision}"
                        profiles.append(p)
                    except Exception as exc:
                        report["notes"].append(f"profile of {r.name} failed: {_one_line(exc)}")
        for r in runners:  # free the models, keep the measurements
            r.fn = None
        del runners
        gc.collect()

    if not args.no_peak and not args.quick:
        # again after the runs: the machine is shared, the least disturbed measurement is the limit
        log("measuring this machine's limits again ...")
        limits = merge_limits(limits, machine_limits(quick=True))
        report["limits"] = limits
    all_rows = []
    for arch, runners in measured:
        all_rows += summarize(arch, runners, batches, report["macs"][arch], _limit_values(limits))
    limits = report["limits"] = apply_observed_limits(all_rows, limits)
    report["load_average"]["end"] = list(os.getloadavg())
    report["notes"] += auto_notes(all_rows, [r for _, rs in measured for r in rs])
    report.update({"rows": all_rows, "profiles": profiles, "ceilings": ceilings(all_rows, limits)})
    print()
    print(peers_markdown(report))
    if args.json:
        from arcdeploy.files import write_json_atomic

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.json, report)
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
