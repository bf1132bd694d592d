"""``--precision auto``: the precision chosen by evidence on this CPU.

1. Candidates from the CPU's flags (:mod:`arcdeploy.machine`) and the engine's capabilities: fp32
   always (the reference, and the answer when nothing else is faithful); bf16 where the CPU has
   bf16 units (AVX512_BF16 or AMX; elsewhere a bf16 package runs f32); fp16 where it has native
   fp16 (AVX512_FP16 / AMX-FP16); int8 where calibration images are given and the CPU has at
   least AVX2 (with VNNI/AMX int8 has dot-product units; on AVX2 alone it still gains, measured).
2. Each candidate is built (one export for all) and checked on the same faces by group
   (:mod:`arcdeploy.fidelity_groups`): colour, face size, the user's folders.
3. Speed is measured, not assumed: every built package runs the same batch of faces in
   interleaved rounds (the machine is shared and noisy; within a round they see the same load).
4. The fastest candidate that meets its floor on every group is kept, except that speeds within
   :data:`SAME_SPEED` count as equal and then the one closer to fp32 wins (on an AMX CPU bf16 runs
   a MobileFaceNet as fast as int8 with a tenth of its error). The manifest says why
   (:class:`arcdeploy.manifest.PrecisionChoiceRecord`).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ArcdeployError, describe
from .files import atomic_dir, refuse_existing, scratch_dir, write_json_atomic
from .machine import FP16_FLAGS, cpu_flags, cpu_name, has_native_bf16, relevant_flags
from .manifest import (
    MANIFEST_NAME,
    PrecisionCandidateRecord,
    PrecisionChoiceRecord,
    read_package_manifest,
)
from .types import AUTO_PRECISION, Precision

if TYPE_CHECKING:
    from .options import BuildOptions, CheckImages

log = logging.getLogger(__name__)

# most faithful first: the order ties are broken in
FIDELITY_ORDER = (Precision.FP32, Precision.BF16, Precision.FP16, Precision.INT8)
SAME_SPEED = 1.10  # a less faithful precision must be at least this much faster to be kept
SPEED_BATCH = 16
SPEED_ROUNDS = 3
SPEED_SECONDS = 1.0
HOW = (
    f"img/s at batch {SPEED_BATCH}, median of {SPEED_ROUNDS} interleaved rounds of {SPEED_SECONDS:g} s per "
    f"package (model time); speeds within {round(100 * (SAME_SPEED - 1))}% count as equal and the more "
    "faithful precision wins"
)


def candidates(engine: str, calib=None) -> list[tuple[Precision, str | None]]:
    """(precision, None) for each precision worth building on this CPU with ``engine``, and
    (precision, why not) for those left out."""
    from .engines import get_engine

    eng = get_engine(engine)
    caps = eng.capabilities
    flags = cpu_flags()
    out: list[tuple[Precision, str | None]] = []
    for p in FIDELITY_ORDER:
        if p not in caps.precisions or p in caps.gpu_only:
            continue
        note = None
        try:
            eng.check_precision(p)
        except ArcdeployError as exc:
            note = str(exc)
        if note is None and p is Precision.BF16 and not has_native_bf16():
            note = "no bf16 units on this CPU (AVX512_BF16 or AMX): a bf16 package would run f32"
        if note is None and p is Precision.FP16 and not flags & FP16_FLAGS:
            note = "no native fp16 on this CPU (AVX512_FP16 or AMX-FP16): an fp16 package would run bf16 or f32"
        if note is None and p is Precision.INT8 and calib is None:
            note = "no calibration images (--calib)"
        if note is None and p is Precision.INT8 and flags and "avx2" not in flags:
            note = "no AVX2 on this CPU: int8 kernels are not faster than fp32 there"
        out.append((p, note))
    return out


def expand(precisions, engine: str, calib) -> tuple[list[Precision], dict[Precision, str]]:
    """``auto`` in a list of precisions -> the candidates this CPU runs fast (:func:`candidates`)
    not already listed, in its place; plus {precision: why not} for those left out."""
    wanted: list = list(dict.fromkeys(precisions))
    if AUTO_PRECISION not in wanted:
        return wanted, {}
    plan = candidates(engine, calib)
    i = wanted.index(AUTO_PRECISION)
    wanted[i : i + 1] = [p for p, note in plan if note is None and p not in wanted]
    return wanted, {p: note for p, note in plan if note}


def interleaved_speed(
    packages: dict[Precision, Path], faces: np.ndarray, threads: int | None = None
) -> dict[Precision, dict]:
    """{precision: {"images_per_s", "rounds"}}: every package on the same batch of aligned faces, in
    turns (:func:`arcdeploy.engines.base.interleaved_rates`)."""
    from .engines.base import interleaved_rates
    from .package import Package

    loaded = {k: Package(p, threads) for k, p in packages.items()}
    try:
        calls, items = {}, {}
        for k, pkg in loaded.items():
            x = pkg.to_model_input(np.resize(faces, (pkg.fixed_batch or SPEED_BATCH, *faces.shape[1:])))
            calls[str(k)] = lambda runtime=pkg.runtime, x=x: runtime.infer(x)
            items[str(k)] = len(x)
        rates = interleaved_rates(calls, items, SPEED_ROUNDS, SPEED_SECONDS, min_runs=2)
    finally:
        for pkg in loaded.values():
            pkg.close()
    return {
        k: {"images_per_s": round(statistics.median(rates[str(k)]), 2), "rounds": [round(r, 2) for r in rates[str(k)]]}
        for k in loaded
    }


def choose(results: dict, skipped: dict | None = None) -> PrecisionChoiceRecord:
    """The choice from each built candidate's ``{"images_per_s", "rounds", "passed", "worst_group",
    "cosine": {"mean", "min"}}`` (``rounds``: per-round img/s, for ratios within a round)."""
    skipped = skipped or {}
    base = results.get(Precision.FP32, {}).get("rounds")
    cands = []
    for p in FIDELITY_ORDER:
        if p in results:
            cands.append(_candidate(p, results[p], base))
        elif p in skipped:
            cands.append(PrecisionCandidateRecord(precision=p, note=skipped[p]))
    timed = [c for c in cands if c.passed and c.images_per_s]
    if not timed:
        raise ArcdeployError(
            "precision auto: no candidate met its fidelity floor on every group of the check images: "
            + "; ".join(f"{c.precision}: {c.note or c.worst_group or 'not built'}" for c in cands)
        )
    fastest = max(timed, key=lambda c: c.images_per_s or 0.0)
    chosen = next(c for c in timed if (c.images_per_s or 0.0) * SAME_SPEED >= (fastest.images_per_s or 0.0))
    return PrecisionChoiceRecord(
        chosen=chosen.precision,
        why=_why(chosen, fastest, cands),
        candidates=tuple(cands),
        how=HOW,
        cpu=cpu_name(),
        flags=tuple(relevant_flags()),
    )


def _candidate(p: Precision, r: dict, base: list[float] | None) -> PrecisionCandidateRecord:
    ratio = round(statistics.median(a / b for a, b in zip(r["rounds"], base)), 3) if base and r.get("rounds") else None
    cos = r.get("cosine") or {}
    return PrecisionCandidateRecord(
        precision=p,
        images_per_s=r.get("images_per_s"),
        vs_fp32=ratio,
        passed=r.get("passed"),
        worst_group=r.get("worst_group"),
        cosine_mean=cos.get("mean"),
        cosine_min=cos.get("min"),
        note=r.get("note"),
    )


def _why(
    chosen: PrecisionCandidateRecord, fastest: PrecisionCandidateRecord, cands: list[PrecisionCandidateRecord]
) -> str:
    def speed(c: PrecisionCandidateRecord) -> str:
        return f"{c.images_per_s:.0f} img/s" + (f", {c.vs_fp32:.2f}x fp32" if c.vs_fp32 else "")

    parts = [f"{chosen.precision}: {speed(chosen)}, meets its floor on every group (worst: {chosen.worst_group})"]
    if fastest is not chosen:
        parts.append(
            f"{fastest.precision} is not {round(100 * (SAME_SPEED - 1))}% faster ({speed(fastest)}), so the more "
            "faithful precision wins"
        )
    for c in cands:
        if c is chosen or c is fastest:
            continue
        if c.passed is False:
            parts.append(f"{c.precision} misses its floor ({c.worst_group})")
        elif c.passed and c.images_per_s:
            parts.append(f"{c.precision} slower ({speed(c)})")
        elif c.note:
            parts.append(f"{c.precision} not built: {c.note}")
    return "; ".join(parts)


def result_of(fidelity) -> dict:
    """What :func:`choose` reads of a candidate's fidelity check (a
    :class:`~arcdeploy.manifest.FidelityRecord`)."""
    return {
        "passed": fidelity.passed,
        "worst_group": fidelity.worst_group,
        "cosine": {"mean": fidelity.cosine.mean, "min": fidelity.cosine.min},
    }


def shared_check_images(opts: BuildOptions) -> CheckImages:
    """One set of check faces for every candidate: the user's, else those an int8 build holds out of
    its calibration images, else ``default_check_images``, else generated faces."""
    from . import generated_check_images
    from .faces.calibration import calibration_split, load_images
    from .faces.prepare import as_detection
    from .fidelity_groups import labels_of_image_set
    from .options import CheckImages
    from .quantize import QuantRecipe

    given = opts.check_images
    if isinstance(given, CheckImages):
        return given
    if given is not None:
        got = load_images(given, opts.check_landmarks, limit=opts.check_count, what="check images")
        return CheckImages(got.faces, got.source, got.source, labels_of_image_set(got))
    if opts.calib is not None:
        count = (opts.recipe or QuantRecipe.for_this_cpu(calibration_count=opts.calib_count)).calibration_count
        detection = as_detection(opts.calib_detector)
        split = calibration_split(opts.calib, opts.calib_landmarks, count=count, detector=detection)
        if split.holdout is not None:
            h = split.holdout.head(opts.check_count)
            return CheckImages(h.faces, f"held-out calibration images ({h.source})", h.source, labels_of_image_set(h))
    return opts.default_check_images or generated_check_images(opts.check_count)


def build_auto(src, out, opts: BuildOptions, build: Callable[[Path, Path, BuildOptions], Path]) -> Path:
    """Build every candidate for this CPU with ``build`` (:func:`arcdeploy.builder.build`, which calls
    this for ``precision="auto"``), check each on the same faces by group, time them in turns, and
    write the chosen package to ``out`` with the choice in its manifest."""
    from .exporter import resolve_export

    out = Path(out)
    refuse_existing(out, opts.force)
    opts.validate()
    plan = candidates(opts.engine, opts.calib)
    skipped: dict = {p: note for p, note in plan if note}
    wanted = [p for p, note in plan if note is None]
    log.info("precision auto on %s: candidates %s", cpu_name(), ", ".join(wanted))
    started = time.time()
    with scratch_dir("auto") as work:
        export_dir = resolve_export(src, work, opts.arch, **opts.onnx_options)
        images = shared_check_images(opts)
        results: dict = {}
        built: dict[Precision, Path] = {}
        for p in wanted:
            cand = replace(
                opts,
                precision=p,
                requested_precision=str(p),
                auto_precision=False,
                calib=opts.calib if p is Precision.INT8 else None,
                check_images=images,
                force=True,
            )
            try:
                built[p] = build(export_dir, work / str(p), cand)
            except ArcdeployError as exc:
                skipped[p] = f"build failed: {describe(exc)}"
                log.warning("precision auto: %s not built: %s", p, describe(exc))
                continue
            results[p] = result_of(read_package_manifest(built[p]).fidelity)
        if not built:
            raise ArcdeployError("precision auto: no candidate could be built: " + "; ".join(skipped.values()))
        for p, speed in interleaved_speed(built, images.faces[:SPEED_BATCH], opts.threads).items():
            results[p].update(speed)
        choice = choose(results, skipped)
        log.info("precision auto: %s", choice.why)
        with atomic_dir(out, force=opts.force) as tmp:
            for f in built[choice.chosen].iterdir():
                shutil.move(str(f), tmp / f.name)
            m = read_package_manifest(tmp)
            m.requested_precision = AUTO_PRECISION
            m.precision_choice = choice
            m.build_seconds = round(time.time() - started, 1)
            write_json_atomic(tmp / MANIFEST_NAME, m.to_json())
    return out
