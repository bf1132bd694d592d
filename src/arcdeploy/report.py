"""report.md / report.json and plots for a run: one table per stage, by precision.

Tables follow the reference pipeline's layout (a row per precision); plots are
the ROC per precision, throughput by precision and batch, and the histogram of
per-image cosine to the fp32 PyTorch reference.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate.roc import FARS
from .files import atomic_file, write_json_atomic
from .machine import cpu_name
from .tables import Table
from .utils import library_versions


def _by_prefix(records, prefix: str) -> dict[str, Any]:
    """{precision-suffix: record} for step names like 'bench openvino-int8'."""
    out = {}
    for rec in records:
        if rec.name.startswith(prefix + " "):
            out[rec.name[len(prefix) + 1 :]] = rec
    return out


def fidelity_table(records) -> Table:
    rows = []
    for name, rec in _by_prefix(records, "check").items():
        if rec.status in ("done", "reused") and rec.result:
            cos = rec.result.get("cosine", {})
            rows.append(
                [
                    name,
                    cos.get("n", rec.result.get("n")),
                    _f6(cos.get("mean")),
                    _f6(cos.get("min")),
                    _f6(cos.get("p1")),
                    _floor_text(rec.result.get("floor")),
                    (rec.result.get("groups") or {}).get("worst"),
                    "pass" if rec.result.get("passed") else "BELOW FLOOR",
                ]
            )
        else:
            rows.append([name, None, None, None, None, None, None, f"{rec.status}: {rec.error}"])
    return Table(
        title="Fidelity: per-image cosine to the fp32 PyTorch reference",
        header=["package", "images", "mean", "min", "p1", "floor", "worst group", "result"],
        rows=rows,
        note="Every group of the check faces (colour / grayscale, face size, folders) is held to the floor; "
        "the worst group is the verdict.",
    )


def choice_table(records) -> Table | None:
    """The precision to deploy on this CPU (the run's "choose precision" step), with the evidence."""
    rec = next((r for r in records if r.name == "choose precision"), None)
    if rec is None:
        return None
    if rec.status not in ("done", "reused") or not rec.result:
        return Table(["precision", "result"], [["-", f"{rec.status}: {rec.error}"]], title="Precision for this CPU")
    res = rec.result
    rows = [
        [
            ("-> " if c["precision"] == res["chosen"] else "") + c["precision"],
            _r(c.get("images_per_s"), 1),
            _r(c.get("vs_fp32"), 2),
            _f6(c.get("cosine_mean")),
            _f6(c.get("cosine_min")),
            c.get("worst_group"),
            {True: "every group", False: "BELOW FLOOR", None: "-"}[c.get("passed")],
            c.get("note"),
        ]
        for c in res["candidates"]
    ]
    return Table(
        title=f"Precision for this CPU: {res['chosen']}",
        header=["precision", "img/s", "x fp32", "cos mean", "cos min", "worst group", "floor met", "note"],
        rows=rows,
        note=f"{res['why']}. Speed: {res['how']}.",
    )


def _floor_text(floor) -> str | None:
    if not floor:
        return None
    if isinstance(floor, dict):
        return ", ".join(f"{k} >= {v}" for k, v in floor.items())
    return str(floor)


def _pct(v):
    return None if v is None else f"{100 * float(v):.2f}"


def _f6(v):
    return None if v is None else f"{float(v):.6f}"


def executed_as(records, name: str) -> str | None:
    """What the engine really ran, from the build's manifest (e.g. a bf16 hint that ran f32)."""
    rec = next((r for r in records if r.name == f"build {name}"), None)
    manifest = (rec.result or {}).get("manifest", {}) if rec else {}
    executed = manifest.get("executed") or {}
    if not executed:
        return manifest.get("precision")
    conv = (executed.get("layers") or {}).get("Convolution", {})
    low = sum(n for p, n in conv.items() if p in ("u8", "i8"))
    if low:
        return f"int8 ({low}/{sum(conv.values())} conv)"
    return executed.get("inference_precision")


def _r(v, nd=2):
    return None if v is None else round(float(v), nd)


def speed_table(records) -> Table:
    rows = []
    base: dict[int, float] = {}
    benches = _by_prefix(records, "bench")
    for name, rec in benches.items():
        if name.endswith("-fp32") and rec.result:
            base = {r["batch"]: r["throughput"] for r in rec.result.get("results", [])}
    for name, rec in benches.items():
        if rec.status in ("done", "reused") and rec.result:
            for r in rec.result.get("results", []):
                lat = r.get("latency_ms", {})
                ratio = r["throughput"] / base[r["batch"]] if base.get(r["batch"]) else None
                rows.append(
                    [
                        name,
                        executed_as(records, name),
                        r["batch"],
                        _r(r["throughput"], 1),
                        _r(lat.get("mean")),
                        _r(lat.get("p50")),
                        _r(lat.get("p90")),
                        _r(lat.get("p99")),
                        _r(ratio),
                    ]
                )
        else:
            rows.append([name, None, None, None, None, None, None, None, f"{rec.status}: {rec.error}"])
    return Table(
        title="Speed: throughput (images/s) and latency (ms) by precision and batch",
        header=["package", "runs as", "batch", "img/s", "mean", "p50", "p90", "p99", "x fp32"],
        rows=rows,
        note="runs as: the precision the engine reports it executed (a CPU without bf16 units runs bf16 as f32).",
    )


def ijb_table(records) -> Table:
    rows = []
    target = None
    mode = None
    counts = None
    for name, rec in _by_prefix(records, "eval ijb").items():
        if rec.status in ("done", "reused") and rec.result:
            res = _first_result(rec.result)
            target = res.get("target", target)
            mode = res.get("mode", mode)
            counts = (res.get("pairs"), res.get("genuine"), res.get("templates"), res.get("images"))
            tar = dict(zip([float(f) for f in res.get("far", [])], res.get("tar", [])))
            rows.append([name, *(f"{100 * tar[f]:.2f}" if f in tar else None for f in FARS)])
        else:
            rows.append([name] + [None] * (len(FARS) - 1) + [f"{rec.status}: {rec.error}"])
    note = f"TAR (%) at FAR; mode {mode}." if mode else None
    if note and counts and counts[0]:
        note += (
            f" {counts[0]} pairs ({counts[1]} genuine), {counts[2]} templates, {counts[3]} images;"
            " a FAR below 1/impostor pairs falls on the ROC's first point."
        )
    return Table(
        title=f"Accuracy: {target or 'IJB'} 1:1 verification, TAR@FAR",
        header=["package"] + [f"{f:.0e}" for f in FARS],
        rows=rows,
        note=note,
    )


def _first_result(result: dict) -> dict:
    if "tar" in result:
        return result
    if result.get("results"):
        return result["results"][0]
    return result


def bins_table(records) -> Table:
    rows = []
    for name, rec in _by_prefix(records, "eval bin").items():
        if rec.status in ("done", "reused") and rec.result:
            for r in rec.result.get("results", []):
                rows.append(
                    [
                        name,
                        r.get("name"),
                        r.get("pairs"),
                        _pct(r.get("accuracy")),
                        _pct(r.get("std")),
                        _r(r.get("xnorm"), 3),
                    ]
                )
        else:
            rows.append([name, None, None, None, None, f"{rec.status}: {rec.error}"])
    return Table(
        title="Accuracy: verification .bin sets (10-fold, flip)",
        header=["package", "set", "pairs", "accuracy %", "std %", "XNorm"],
        rows=rows,
    )


def steps_table(records) -> Table:
    rows = [[r.name, r.status, _r(r.seconds, 1), r.error] for r in records]
    return Table(title="Steps", header=["step", "status", "seconds", "note"], rows=rows)


# ---------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roc(records, path: Path) -> Path | None:
    from .evaluate.plots import plot_roc as draw_roc

    curves = []
    for name, rec in _by_prefix(records, "eval ijb").items():
        if rec.status in ("done", "reused") and rec.result:
            res = _first_result(rec.result)
            roc = res.get("roc") or {}
            if roc.get("fpr") and roc.get("tpr"):
                curves.append((name, np.asarray(roc["fpr"]), np.asarray(roc["tpr"])))
    if not curves:
        return None
    return draw_roc(curves, path, title="ROC by precision")


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as out:
        fig.savefig(out, format="png", dpi=110)


def plot_throughput(records, path: Path) -> Path | None:
    data = {}
    for name, rec in _by_prefix(records, "bench").items():
        if rec.status in ("done", "reused") and rec.result:
            data[name] = {r["batch"]: r["throughput"] for r in rec.result.get("results", [])}
    if not data:
        return None
    plt = _plt()
    batches = sorted({b for d in data.values() for b in d})
    width = 0.8 / len(data)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, d) in enumerate(data.items()):
        xs = [j + i * width for j in range(len(batches))]
        ax.bar(xs, [d.get(b, 0) for b in batches], width, label=name)
    ax.set_xticks([j + width * (len(data) - 1) / 2 for j in range(len(batches))])
    ax.set_xticklabels([f"batch {b}" for b in batches])
    ax.set_ylabel("images / s")
    ax.set_title("Throughput by precision and batch")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_cosine_hist(records, path: Path) -> Path | None:
    data = {}
    for name, rec in _by_prefix(records, "check").items():
        if rec.status in ("done", "reused") and rec.result and rec.result.get("per_image"):
            data[name] = np.asarray(rec.result["per_image"], dtype=np.float64)
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    lo = min(float(v.min()) for v in data.values())
    bins = np.linspace(min(lo, 0.999), 1.0, 60)
    for name, v in data.items():
        ax.hist(np.clip(v, bins[0], 1.0), bins=bins, alpha=0.6, label=name)
    ax.set_xlabel("cosine to fp32 PyTorch (per image)")
    ax.set_ylabel("images")
    ax.set_title("Fidelity by precision")
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- writing


def build_tables(records) -> list[Table]:
    tables = [fidelity_table(records), speed_table(records)]
    choice = choice_table(records)
    if choice is not None:
        tables.append(choice)
    if _by_prefix(records, "eval ijb"):
        tables.append(ijb_table(records))
    if _by_prefix(records, "eval bin"):
        tables.append(bins_table(records))
    tables.append(steps_table(records))
    return tables


def write_report(
    out: Path, records, engine: str, precisions, ckpt: str, title: str | None = None, notes: list[str] | None = None
) -> tuple[Path, Path]:
    out = Path(out)
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    tables = build_tables(records)
    plots = {
        "roc": plot_roc(records, plots_dir / "roc.png"),
        "throughput": plot_throughput(records, plots_dir / "throughput.png"),
        "cosine_histogram": plot_cosine_hist(records, plots_dir / "cosine_hist.png"),
    }
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    versions = library_versions("arcdeploy", "torch", "openvino", "nncf", "onnxruntime", "numpy")
    lines = [
        f"# {title or 'arcdeploy report'}",
        "",
        f"- checkpoint: `{ckpt}`",
        f"- engine: {engine}; precisions: {', '.join(precisions)}",
        f"- CPU: {cpu_name()}",
        f"- date: {now}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    for note in notes or []:
        lines += [f"> {note}", ""]
    for t in tables:
        lines += [t.markdown(), ""]
    for name, p in plots.items():
        if p is not None:
            lines += [f"![{name}](plots/{p.name})", ""]
    md = out / "report.md"
    tmp = md.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(md)
    js = out / "report.json"
    write_json_atomic(
        js,
        {
            "title": title,
            "checkpoint": ckpt,
            "engine": engine,
            "precisions": list(precisions),
            "cpu": cpu_name(),
            "date": now,
            "versions": versions,
            "notes": notes or [],
            "tables": [t.as_json() for t in tables],
            "plots": {k: (f"plots/{p.name}" if p else None) for k, p in plots.items()},
            "steps": [
                {
                    "name": r.name,
                    "status": r.status,
                    "seconds": r.seconds,
                    "error": r.error,
                    "result": _compact(r.result),
                }
                for r in records
            ],
        },
    )
    return md, js


def _compact(value, limit: int = 200):
    """The step result without long arrays (per-image cosines, ROC points): those stay in their own files."""
    if isinstance(value, dict):
        return {k: _compact(v, limit) for k, v in value.items()}
    if isinstance(value, list) and len(value) > limit:
        return f"<{len(value)} values>"
    if isinstance(value, list):
        return [_compact(v, limit) for v in value]
    return value


def tables_text(records) -> str:
    """Every table of a run as aligned text, for the terminal."""
    return "\n\n".join(t.text() for t in build_tables(records)) + "\n"
