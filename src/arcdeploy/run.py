"""One command for the whole job: export -> build (each precision) -> check -> bench -> eval -> report.

The IJB step evaluates 1:1 verification and, when the 1:N list files are present, 1:N
identification too, from one feature extraction. ``auto`` among the precisions (the default)
builds the candidates this CPU runs fast; with two packages or more, a "choose precision" step
says which one to deploy: the fastest that meets its floor on every group of the check images.

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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .auto_precision import expand
from .errors import ArcdeployError, describe
from .files import write_json_atomic
from .manifest import read_export_manifest, read_package_manifest
from .options import BuildOptions, RunOptions
from .types import Precision

logger = logging.getLogger(__name__)

RUN_MARKER = ".arcdeploy-run"  # marks a folder as one arcdeploy run/demo writes into


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


def _file_key(path) -> dict:
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return {"path": str(p.resolve()), "size": st.st_size, "mtime": st.st_mtime_ns}
    return {"path": str(p.resolve()) if p.exists() else str(p)}


def run_pipeline(ckpt, out, options: RunOptions | None = None, log: Callable[[str], None] | None = None, **kwargs):
    """Run every stage for one checkpoint as ``options`` (or the keyword arguments of
    :class:`~arcdeploy.options.RunOptions` and its build's) say; returns what each step did.
    Writes OUT/report.{md,json}.

    OUT must be new, empty, or an earlier run's folder; a folder with other content is
    refused unless ``force`` (arcdeploy then writes its files beside the user's)."""
    from . import report

    if options is not None and kwargs:
        raise TypeError("run_pipeline(): give options or keyword arguments, not both")
    opts = options or RunOptions.from_kwargs(**kwargs)
    out = Path(out)
    claim_output(out, opts.force)
    runner = StepRunner(out, log or logger.info)
    export_dir = out / "export"
    ckpt_key = _file_key(ckpt)
    engine = opts.build.engine
    precisions, left_out = expand(opts.precisions, engine, opts.build.calib)
    _export_step(runner, ckpt, ckpt_key, opts, export_dir)
    packages = _build_steps(runner, ckpt_key, opts, precisions, export_dir, out / "packages")
    for stage, inputs, work in _package_stages(opts, out):
        for precision, pkg_dir in packages.items():
            name = f"{engine}-{precision}"
            key = {"build": runner.state.get(f"build {name}", {}).get("key"), **inputs}
            runner.run(f"{stage} {name}", key, functools.partial(work, pkg_dir, name), needs=[f"build {name}"])
    if len(packages) >= 2:  # the precision this CPU should run, by evidence (as --precision auto)
        _choose_step(runner, engine, packages, left_out, opts.build.threads)

    result = RunResult(out, runner.records)
    result.report_md, result.report_json = report.write_report(
        out,
        runner.records,
        engine=engine,
        precisions=list(precisions),
        ckpt=str(ckpt),
        title=opts.title,
        notes=list(opts.notes),
    )
    return result


def _export_step(runner: StepRunner, ckpt, ckpt_key: dict, opts: RunOptions, export_dir: Path) -> None:
    def do_export():
        from .exporter import export

        export(ckpt, export_dir, arch=opts.build.arch, force=True)
        return {"dir": str(export_dir), "manifest": read_export_manifest(export_dir).to_json()}

    runner.run("export", {"ckpt": ckpt_key, "arch": opts.build.arch}, do_export)


def _build_steps(
    runner: StepRunner, ckpt_key: dict, opts: RunOptions, precisions: list[Precision], export_dir: Path, root: Path
) -> dict:
    """One build step per precision; {precision: package folder} of those built (or reused)."""
    packages: dict[Precision, Path] = {}
    b = opts.build
    for precision in precisions:
        name = f"{b.engine}-{precision}"
        pkg_dir = root / name
        # the run's fidelity check is a step of its own: the build checks on its defaults
        options = BuildOptions(
            engine=b.engine,
            precision=precision,
            calib=b.calib,
            calib_landmarks=b.calib_landmarks,
            threads=b.threads,
            recipe=b.recipe,
        )

        def do_build(options=options, pkg_dir=pkg_dir):
            from . import build

            build(export_dir, pkg_dir, replace(options, force=True))
            return {"package": str(pkg_dir), "manifest": read_package_manifest(pkg_dir).to_json()}

        key = {
            "ckpt": ckpt_key,
            "engine": b.engine,
            "precision": precision,
            "calib": _file_key(b.calib) if b.calib else None,
            "calib_landmarks": _file_key(b.calib_landmarks) if b.calib_landmarks else None,
            **({"recipe": b.recipe.to_json()} if b.recipe is not None and precision is Precision.INT8 else {}),
        }
        rec = runner.run(f"build {name}", key, do_build, needs=["export"])
        if rec.status in ("done", "reused"):
            packages[precision] = pkg_dir
    return packages


def _choose_step(
    runner: StepRunner, engine: str, packages: dict[Precision, Path], left_out: dict, threads: int | None
) -> None:
    """The "choose precision" step: each package's check by group and its speed, timed in turns on
    this CPU, decide which precision to deploy (:func:`arcdeploy.auto_precision.choose`)."""

    def do_choose():
        from .auto_precision import SPEED_BATCH, choose, interleaved_speed, result_of
        from .manifest import FidelityRecord

        results = {}
        for precision in packages:
            chk = runner.result(f"check {engine}-{precision}")
            if chk:
                results[precision] = result_of(FidelityRecord.from_json(chk, f"check {engine}-{precision}", "check"))
        faces = np.random.default_rng(0).integers(0, 256, (SPEED_BATCH, 112, 112, 3), dtype=np.uint8)
        for p, speed in interleaved_speed({p: packages[p] for p in results}, faces, threads).items():
            results[p].update(speed)
        return choose(results, left_out).to_json()

    checks = [f"check {engine}-{p}" for p in packages]
    key = {"checks": {name: runner.state.get(name, {}).get("key") for name in checks}, "threads": threads}
    runner.run("choose precision", key, do_choose, needs=checks)


def _package_stages(opts: RunOptions, out: Path) -> list[tuple[str, dict, Callable[[Path, str], Any]]]:
    """The stages run on each package: (step prefix, what else the result depends on, the work)."""

    def do_check(pkg_dir, name):
        from . import check

        return check(pkg_dir, images=opts.check_images, landmarks=opts.check_landmarks).to_json()

    def do_bench(pkg_dir, name):
        from .bench import bench

        return bench(
            str(pkg_dir), batches=opts.batches, iterations=opts.iterations, threads=opts.build.threads
        ).to_json()

    def do_ijb(pkg_dir, name):
        from .evaluate.ijb import evaluate_packages

        return evaluate_packages(
            [pkg_dir], root=opts.ijb_root, target=opts.target, flip=opts.ijb_flip, out_dir=out / "eval" / "ijb" / name
        )

    def do_bins(pkg_dir, name):
        from .evaluate.binsets import evaluate_bins

        results = evaluate_bins(pkg_dir, [str(b) for b in opts.bins])
        return {"package": str(pkg_dir), "results": [r.to_json() for r in results]}

    check_key = {"images": _file_key(opts.check_images) if opts.check_images else None}
    bench_key = {"batches": list(opts.batches), "iterations": opts.iterations, "threads": opts.build.threads}
    stages: list[tuple[str, dict, Callable[[Path, str], Any]]] = [
        ("check", check_key, do_check),
        ("bench", bench_key, do_bench),
    ]
    if opts.ijb_root:
        from .evaluate.ijb import list_paths

        # the 1:N list files, when present, are evaluated in the same step from the same features
        lists = [_file_key(p) for p in list_paths(opts.ijb_root, opts.target).values() if p.is_file()]
        ijb_key = {"root": str(opts.ijb_root), "target": opts.target, "flip": opts.ijb_flip}
        if lists:
            ijb_key["1:N lists"] = lists
        stages.append(("eval ijb", ijb_key, do_ijb))
    if opts.bins:
        stages.append(("eval bin", {"bins": [_file_key(b) for b in opts.bins]}, do_bins))
    return stages
