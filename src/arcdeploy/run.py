"""One command for the whole job: export -> build (each precision) -> check -> bench -> eval -> report.

Every step writes its result as JSON under OUT and is recorded in
``OUT/steps.json`` with a key made from its inputs. A rerun with the same
inputs reuses finished steps; a step that fails is recorded with its one-line
reason and the steps that do not depend on it still run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArcdeployError, describe
from .files import write_json_atomic

logger = logging.getLogger(__name__)

DEFAULT_PRECISIONS = ("auto",)  # the candidates this CPU runs fast, and the choice among them
RUN_MARKER = ".arcdeploy-run"  # marks a folder as one arcdeploy run/demo writes into
DEFAULT_BATCHES = (1, 16)


@dataclass
class StepRecord:
    name: str
    status: str  # "done", "reused", "failed", "skipped"
    seconds: float = 0.0
    result: Any = None
    error: str | None = None


@dataclass
class RunResult:
    out: Path
    steps: list[StepRecord] = field(default_factory=list)
    report_md: Path | None = None
    report_json: Path | None = None

    @property
    def failed(self) -> list[StepRecord]:
        return [s for s in self.steps if s.status == "failed"]


def claim_output(out: Path, force: bool = False) -> None:
    """Make ``out`` a run folder: refuse one with content arcdeploy did not write (unless ``force``)."""
    if out.exists() and not out.is_dir():
        raise ArcdeployError(f"{out}: exists and is not a folder")
    marker = out / RUN_MARKER
    if out.exists() and not marker.exists() and any(out.iterdir()) and not force:
        raise ArcdeployError(
            f"{out}: not empty and not made by arcdeploy run; choose a new folder, or use --force to write into it"
        )
    if not marker.exists():
        write_json_atomic(marker, {"made_by": "arcdeploy", "note": "arcdeploy run writes and reuses this folder"})


class StepRunner:
    """Runs named steps, reusing finished ones whose input key is unchanged."""

    def __init__(self, out: Path, log: Callable[[str], None] = logger.info):
        self.out = out
        self.state_path = out / "steps.json"
        self.state: dict[str, dict] = {}
        if self.state_path.exists():
            try:
                self.state = json.loads(self.state_path.read_text())
            except ValueError:
                self.state = {}  # a damaged state file only costs recomputation
        self.records: list[StepRecord] = []
        self.log = log

    def run(self, name: str, key: dict, fn: Callable[[], Any], needs: list[str] | None = None) -> StepRecord:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        failed_deps = [d for d in (needs or []) if self.status(d) not in ("done", "reused")]
        if failed_deps:
            rec = StepRecord(name, "skipped", error=f"needs {', '.join(failed_deps)}")
            self.log(f"[skip] {name}: {rec.error}")
            return self._record(rec, digest, persist=False)
        prev = self.state.get(name)
        if prev and prev.get("status") in ("done", "reused") and prev.get("key") == digest:
            rec = StepRecord(name, "reused", prev.get("seconds", 0.0), prev.get("result"))
            self.log(f"[reuse] {name}")
            return self._record(rec, digest, persist=False)
        self.log(f"[run] {name} ...")
        start = time.perf_counter()
        try:
            result = fn()
            rec = StepRecord(name, "done", time.perf_counter() - start, result)
            self.log(f"[done] {name} ({rec.seconds:.1f} s)")
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # a failed step is reported; the run goes on
            reason = describe(exc)
            if not isinstance(exc, ArcdeployError) and os.environ.get("ARCDEPLOY_DEBUG"):
                traceback.print_exc()
            rec = StepRecord(name, "failed", time.perf_counter() - start, error=reason)
            self.log(f"[FAILED] {name}: {reason}")
        return self._record(rec, digest, persist=True)

    def status(self, name: str) -> str | None:
        for rec in reversed(self.records):
            if rec.name == name:
                return rec.status
        return None

    def result(self, name: str) -> Any:
        for rec in reversed(self.records):
            if rec.name == name:
                return rec.result
        return None

    def _record(self, rec: StepRecord, digest: str, persist: bool) -> StepRecord:
        self.records.append(rec)
        if persist:
            self.state[rec.name] = {
                "status": rec.status,
                "key": digest,
                "seconds": rec.seconds,
                "result": rec.result,
                "error": rec.error,
            }
            write_json_atomic(self.state_path, self.state)
        return rec


def expand_auto(precisions, engine: str, calib) -> tuple[list[str], dict[str, str]]:
    """``auto`` in a precision list -> the candidates this CPU runs fast (see
    :func:`arcdeploy.auto_precision.candidates`), plus {precision: why not} for those left out."""
    wanted = list(dict.fromkeys(precisions))
    if "auto" not in wanted:
        return wanted, {}
    from .auto_precision import candidates

    plan = candidates(engine, calib)
    i = wanted.index("auto")
    wanted[i : i + 1] = [p for p, note in plan if note is None and p not in wanted]
    return wanted, {p: note for p, note in plan if note}


def _file_key(path) -> dict:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
    return {"path": str(p.resolve()) if p.exists() else str(p)}


def _load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def run_pipeline(
    ckpt,
    out,
    engine: str = "openvino",
    precisions=DEFAULT_PRECISIONS,
    calib=None,
    calib_landmarks=None,
    check_images=None,
    check_landmarks=None,
    ijb_root=None,
    target: str = "IJBC",
    bins=(),
    batches=DEFAULT_BATCHES,
    iterations: int | None = None,
    threads: int | None = None,
    arch: str = "auto",
    ijb_flip: bool = True,
    log: Callable[[str], None] | None = None,
    title: str | None = None,
    notes: list[str] | None = None,
    force: bool = False,
) -> RunResult:
    """Run every stage for one checkpoint; returns what each step did. Writes OUT/report.{md,json}.

    OUT must be new, empty, or an earlier run's folder; a folder with other content is
    refused unless ``force`` (arcdeploy then writes its files beside the user's)."""
    from . import report

    out = Path(out)
    claim_output(out, force)
    log = log or logger.info
    runner = StepRunner(out, log)
    precisions, skipped = expand_auto(precisions, engine, calib)
    ckpt_key = _file_key(ckpt)
    export_dir = out / "export"

    def do_export():
        from .exporter import export

        export(ckpt, export_dir, arch=arch, force=True)
        return {"dir": str(export_dir), "manifest": _load_json(export_dir / "manifest.json")}

    runner.run("export", {"ckpt": ckpt_key, "arch": arch}, do_export)

    packages: dict[str, Path] = {}
    for precision in precisions:
        name = f"{engine}-{precision}"
        pkg_dir = out / "packages" / name

        def do_build(precision=precision, pkg_dir=pkg_dir):
            from . import build

            build(
                export_dir,
                pkg_dir,
                engine=engine,
                precision=precision,
                calib=calib,
                calib_landmarks=calib_landmarks,
                threads=threads,
                force=True,
            )
            return {"package": str(pkg_dir), "manifest": _load_json(pkg_dir / "manifest.json")}

        key = {
            "ckpt": ckpt_key,
            "engine": engine,
            "precision": precision,
            "calib": _file_key(calib) if calib else None,
            "calib_landmarks": _file_key(calib_landmarks) if calib_landmarks else None,
        }
        rec = runner.run(f"build {name}", key, do_build, needs=["export"])
        if rec.status in ("done", "reused"):
            packages[precision] = pkg_dir

    # per-package stages: (step prefix, what else the result depends on, the work)
    def do_check(pkg_dir, name):
        from . import check

        return check(pkg_dir, images=check_images, landmarks=check_landmarks).to_json()

    def do_bench(pkg_dir, name):
        from .bench import bench

        return bench(str(pkg_dir), batches=tuple(batches), iterations=iterations, threads=threads).to_json()

    def do_ijb(pkg_dir, name):
        from .evaluate.ijb import evaluate_packages

        return evaluate_packages(
            [pkg_dir], root=ijb_root, target=target, flip=ijb_flip, out_dir=out / "eval" / "ijb" / name
        )

    def do_bins(pkg_dir, name):
        from .evaluate.binsets import evaluate_bins

        return evaluate_bins(pkg_dir, [str(b) for b in bins])

    stages: list[tuple[str, dict, Callable[[Path, str], Any]]] = [
        ("check", {"images": _file_key(check_images) if check_images else None}, do_check),
        ("bench", {"batches": list(batches), "iterations": iterations, "threads": threads}, do_bench),
    ]
    if ijb_root:
        stages.append(("eval ijb", {"root": str(ijb_root), "target": target, "flip": ijb_flip}, do_ijb))
    if bins:
        stages.append(("eval bin", {"bins": [_file_key(b) for b in bins]}, do_bins))
    for stage, inputs, work in stages:
        for precision, pkg_dir in packages.items():
            name = f"{engine}-{precision}"
            key = {"build": runner.state.get(f"build {name}", {}).get("key"), **inputs}
            runner.run(f"{stage} {name}", key, functools.partial(work, pkg_dir, name), needs=[f"build {name}"])

    if len(packages) >= 2:  # the precision this CPU should run, by evidence (as --precision auto)

        def do_choose():
            from .auto_precision import SPEED_BATCH, choose, interleaved_speed

            results = {}
            for precision in packages:
                chk = runner.result(f"check {engine}-{precision}")
                if chk:
                    groups = chk.get("groups") or {}
                    results[precision] = {
                        "passed": bool(chk.get("passed")),
                        "worst_group": groups.get("worst"),
                        "cosine": chk.get("cosine"),
                    }
            faces = np.random.default_rng(0).integers(0, 256, (SPEED_BATCH, 112, 112, 3), dtype=np.uint8)
            for p, speed in interleaved_speed({p: packages[p] for p in results}, faces, threads).items():
                results[p].update(speed)
            return choose(results, skipped).to_json()

        keys = {p: runner.state.get(f"check {engine}-{p}", {}).get("key") for p in packages}
        runner.run("choose precision", {"checks": keys}, do_choose, needs=[f"check {engine}-{p}" for p in packages])

    result = RunResult(out, runner.records)
    result.report_md, result.report_json = report.write_report(
        out, runner.records, engine=engine, precisions=precisions, ckpt=str(ckpt), title=title, notes=notes or []
    )
    return result
