"""report.md / report.json and plots for a run: one table per stage, by precision.

Tables follow the reference pipeline's layout (a row per precision); plots are
the ROC per precision (and TPIR against FPIR where the IJB set has 1:N lists),
throughput by precision and batch, and the histogram of per-image cosine to the
fp32 PyTorch reference.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .bench import BenchResult
from .errors import ArcdeployError
from .evaluate.binsets import BinResult
from .evaluate.roc import FARS
from .fidelity import FidelityResult
from .files import atomic_file, write_json_atomic
from .machine import cpu_name
from .manifest import PackageManifest, PrecisionChoiceRecord
from .tables import Table
from .utils import library_versions

T = TypeVar("T")


def _by_prefix(records, prefix: str) -> dict[str, Any]:
    """{precision-suffix: record} for step names like 'bench openvino-int8'."""
    out = {}
    for rec in records:
        if rec.name.startswith(prefix + " "):
            out[rec.name[len(prefix) + 1 :]] = rec
    return out


@dataclass
class IjbSummary:
    """What the report shows of an IJB evaluation step: the first package's result."""

    target: str
    mode: str
    far: list[float]
    tar: list[float]
    pairs: int | None = None
    genuine: int | None = None
    templates: int | None = None
    images: int | None = None
    roc_fpr: list[float] = field(default_factory=list)
    roc_tpr: list[float] = field(default_factory=list)

    @classmethod
    def from_json(cls, result: dict) -> IjbSummary:
        res = result if "tar" in result else result["results"][0]  # one result, or a document of them
        roc = res.get("roc") or {}
        return cls(
            target=res["target"],
            mode=res["mode"],
            far=[float(f) for f in res["far"]],
            tar=[float(t) for t in res["tar"]],
            pairs=res.get("pairs"),
            genuine=res.get("genuine"),
            templates=res.get("templates"),
            images=res.get("images"),
            roc_fpr=list(roc.get("fpr") or []),
            roc_tpr=list(roc.get("tpr") or []),
        )


@dataclass
class Ijb1nSummary:
    """What the report shows of an IJB step's 1:N identification: the first package's result."""

    target: str
    mode: str
    fpir: list[float]
    tpir_mean: list[float]  # NaN where a gallery had no mated probe
    shown: dict[str, list[float | None]]  # gallery -> TPIR at the reported FPIRs
    rank: dict[str, float]
    labels: list[tuple[str, str]]  # (G1 | G2 | mean, the gallery's name)
    galleries: list[tuple[str, int]]  # (name, templates)
    probes: int | None = None

    @classmethod
    def from_json(cls, result: dict) -> Ijb1nSummary:
        res = result["identification"]
        galleries = res.get("galleries") or {}
        names = {k: str(g.get("name", k)) for k, g in galleries.items()}
        return cls(
            target=res["target"],
            mode=res["mode"],
            fpir=[float(f) for f in res["fpir"]],
            tpir_mean=[np.nan if v is None else float(v) for v in res["tpir"]["mean"]],
            shown=dict((res.get("shown") or {}).get("tpir", {})),
            rank={k: float(v) for k, v in (res.get("rank") or {}).items()},
            labels=[(k, names.get(k, k)) for k in ("G1", "G2", "mean")],
            galleries=[(names[k], int(g.get("templates", 0))) for k, g in galleries.items()],
            probes=res.get("probes"),
        )


def _bins(result: dict) -> list[BinResult]:
    return [BinResult.from_json(r) for r in result["results"]]


def _manifest(result: dict) -> PackageManifest:
    return PackageManifest.from_json(result["manifest"], "the build step's manifest")


def _fidelity(result: dict) -> FidelityResult:
    return FidelityResult.from_json(result, "the check step's result")


def _done(records, prefix: str, parse: Callable[[Any], T]) -> dict[str, tuple[Any, T | None]]:
    """{package: (step record, its result typed by ``parse``)}; the result is None when the step did not
    finish or its stored result cannot be read (a run folder written by another version)."""
    out: dict[str, tuple[Any, T | None]] = {}
    for name, rec in _by_prefix(records, prefix).items():
        typed = None
        if rec.status in ("done", "reused") and rec.result:
            try:
                typed = parse(rec.result)
            except (ArcdeployError, KeyError, TypeError, ValueError, IndexError):
                typed = None
        out[name] = (rec, typed)
    return out


def _not_done(rec) -> str:
    return f"{rec.status}: {rec.error}" if rec.error or rec.status not in ("done", "reused") else "unreadable result"


def fidelity_table(records) -> Table:
    rows: list[list[Any]] = []
    for name, (rec, res) in _done(records, "check", _fidelity).items():
        if res is None:
            rows.append([name, None, None, None, None, None, None, _not_done(rec)])
            continue
        cos = res.cosine
        floor = ", ".join(f"{k} >= {v}" for k, v in res.floor.items()) or None
        result = "pass" if res.passed else "BELOW FLOOR"
        worst = res.groups.worst if res.groups else None
        rows.append([name, cos.n, _f6(cos.mean), _f6(cos.min), _f6(cos.p1), floor, worst, result])
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
    res = None
    if rec.status in ("done", "reused") and rec.result:
        try:
            res = PrecisionChoiceRecord.from_json(rec.result, "the choose precision step's result")
        except ArcdeployError:
            res = None
    if res is None:
        return Table(["precision", "result"], [["-", _not_done(rec)]], title="Precision for this CPU")
    passed = {True: "every group", False: "BELOW FLOOR", None: "-"}
    rows = [
        [
            ("-> " if c.precision == res.chosen else "") + c.precision,
            _r(c.images_per_s, 1),
            _r(c.vs_fp32, 2),
            _f6(c.cosine_mean),
            _f6(c.cosine_min),
            c.worst_group,
            passed[c.passed],
            c.note,
        ]
        for c in res.candidates
    ]
    return Table(
        title=f"Precision for this CPU: {res.chosen}",
        header=["precision", "img/s", "x fp32", "cos mean", "cos min", "worst group", "floor met", "note"],
        rows=rows,
        note=f"{res.why}. Speed: {res.how}.",
    )


def _pct(v):
    return None if v is None else f"{100 * float(v):.2f}"


def _f6(v):
    return None if v is None else f"{float(v):.6f}"


def executed_as(records, name: str) -> str | None:
    """What the engine really ran, from the build's manifest (e.g. a bf16 hint that ran f32)."""
    _, manifest = _done(records, "build", _manifest).get(name, (None, None))
    if manifest is None:
        return None
    executed = manifest.executed
    if executed is None:
        return manifest.precision
    conv = (executed.layers or {}).get("Convolution", {})
    low = sum(n for p, n in conv.items() if p in ("u8", "i8"))
    if low:
        return f"int8 ({low}/{sum(conv.values())} conv)"
    return executed.inference_precision


def _r(v, nd=2):
    return None if v is None else round(float(v), nd)


def speed_table(records) -> Table:
    rows: list[list[Any]] = []
    benches = _done(records, "bench", BenchResult.from_json)
    base: dict[int, float] = {}
    for name, (_, res) in benches.items():
        if name.endswith("-fp32") and res is not None:
            base = {r.batch: r.throughput for r in res.results}
    for name, (rec, res) in benches.items():
        if res is None:
            rows.append([name, None, None, None, None, None, None, None, _not_done(rec)])
            continue
        for r in res.results:
            lat = r.latency_ms
            ratio = r.throughput / base[r.batch] if base.get(r.batch) else None
            rows.append(
                [
                    name,
                    executed_as(records, name),
                    r.batch,
                    _r(r.throughput, 1),
                    _r(lat["mean"]),
                    _r(lat["p50"]),
                    _r(lat["p90"]),
                    _r(lat["p99"]),
                    _r(ratio),
                ]
            )
    return Table(
        title="Speed: throughput (images/s) and latency (ms) by precision and batch",
        header=["package", "runs as", "batch", "img/s", "mean", "p50", "p90", "p99", "x fp32"],
        rows=rows,
        note="runs as: the precision the engine reports it executed (a CPU without bf16 units runs bf16 as f32).",
    )


def ijb_table(records) -> Table:
    rows: list[list[Any]] = []
    last: IjbSummary | None = None
    for name, (rec, res) in _done(records, "eval ijb", IjbSummary.from_json).items():
        if res is None:
            rows.append([name] + [None] * (len(FARS) - 1) + [_not_done(rec)])
            continue
        last = res
        tar = dict(zip(res.far, res.tar))
        rows.append([name, *(f"{100 * tar[f]:.2f}" if f in tar else None for f in FARS)])
    note = f"TAR (%) at FAR; mode {last.mode}." if last else None
    if last and note and last.pairs:
        note += (
            f" {last.pairs} pairs ({last.genuine} genuine), {last.templates} templates, {last.images} images;"
            " a FAR below 1/impostor pairs falls on the ROC's first point."
        )
    return Table(
        title=f"Accuracy: {last.target if last else 'IJB'} 1:1 verification, TAR@FAR",
        header=["package"] + [f"{f:.0e}" for f in FARS],
        rows=rows,
        note=note,
    )


def ijb_1n_table(records) -> Table:
    """TPIR (%) at FPIR 1e-4 ... 1 per package and gallery, rank-1/5/10 on the mean row."""
    rows = []
    last: Ijb1nSummary | None = None
    for name, (_, res) in _done(records, "eval ijb", Ijb1nSummary.from_json).items():
        if res is None:
            continue
        last = res
        for key, label in res.labels:
            ranks = [_pct(res.rank.get(k)) for k in ("1", "5", "10")] if key == "mean" else [None] * 3
            rows.append([name, label, *(_pct(v) for v in res.shown.get(key, [None] * 5)), *ranks])
    note = None
    if last is not None:
        note = (
            f"TPIR (%) at FPIR, each gallery searched on its own, as insightface's ijb_evals.py; mode {last.mode}. "
            "rank-k: mates within the top k in either gallery / all probes."
        )
        if last.probes:
            sizes = ", ".join(f"{n}: {t} templates" for n, t in last.galleries)
            note += f" {last.probes} probe templates; {sizes}."
    return Table(
        title=f"Accuracy: {last.target if last else 'IJB'} 1:N identification, TPIR@FPIR",
        header=["package", "gallery", "1e-4", "1e-3", "1e-2", "1e-1", "1", "rank-1", "rank-5", "rank-10"],
        rows=rows,
        note=note,
    )


def _has_1n(records) -> bool:
    return any(res is not None for _, res in _done(records, "eval ijb", Ijb1nSummary.from_json).values())


def bins_table(records) -> Table:
    rows: list[list[Any]] = []
    for name, (rec, res) in _done(records, "eval bin", _bins).items():
        if res is None:
            rows.append([name, None, None, None, None, _not_done(rec)])
            continue
        for r in res:
            rows.append([name, r.name, r.pairs, _pct(r.accuracy), _pct(r.std), _r(r.xnorm, 3)])
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

    curves = [
        (name, np.asarray(res.roc_fpr), np.asarray(res.roc_tpr))
        for name, (_, res) in _done(records, "eval ijb", IjbSummary.from_json).items()
        if res is not None and res.roc_fpr and res.roc_tpr
    ]
    if not curves:
        return None
    return draw_roc(curves, path, title="ROC by precision")


def plot_tpir(records, path: Path) -> Path | None:
    from .evaluate.plots import plot_tpir_fpir

    curves = [
        (f"{name} (mean of galleries)", np.asarray(res.fpir), np.asarray(res.tpir_mean, np.float64))
        for name, (_, res) in _done(records, "eval ijb", Ijb1nSummary.from_json).items()
        if res is not None and res.fpir and res.tpir_mean
    ]
    if not curves:
        return None
    return plot_tpir_fpir(curves, path, title="1:N identification by precision")


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as out:
        fig.savefig(out, format="png", dpi=110)


def plot_throughput(records, path: Path) -> Path | None:
    data = {
        name: {r.batch: r.throughput for r in res.results}
        for name, (_, res) in _done(records, "bench", BenchResult.from_json).items()
        if res is not None
    }
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
    data = {
        name: res.per_image
        for name, (_, res) in _done(records, "check", _fidelity).items()
        if res is not None and res.per_image is not None
    }
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
        if _has_1n(records):
            tables.append(ijb_1n_table(records))
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
        "tpir_fpir": plot_tpir(records, plots_dir / "tpir_fpir.png"),
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
