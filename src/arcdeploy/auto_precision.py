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
   (:class:`arcdeploy.manifest.PrecisionChoice`).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArcdeployError, describe
from .files import atomic_dir, refuse_existing, scratch_dir, write_json_atomic
from .machine import cpu_flags, cpu_name, has_native_bf16, relevant_flags
from .manifest import MANIFEST_NAME, PrecisionCandidate, PrecisionChoice, read_package_manifest

log = logging.getLogger(__name__)

# most faithful first: the order ties are broken in
FIDELITY_ORDER = ("fp32", "bf16", "fp16", "int8")
SAME_SPEED = 1.10  # a less faithful precision must be at least this much faster to be kept
SPEED_BATCH = 16
SPEED_ROUNDS = 3
SPEED_SECONDS = 1.0
FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})
HOW = (
    f"img/s at batch {SPEED_BATCH}, median of {SPEED_ROUNDS} interleaved rounds of {SPEED_SECONDS:g} s per "
    f"package (model time); speeds within {round(100 * (SAME_SPEED - 1))}% count as equal and the more "
    "faithful precision wins"
)


def candidates(engine: str, calib=None) -> list[tuple[str, str | None]]:
    """(precision, None) for each precision worth building on this CPU with ``engine``, and
    (precision, why not) for those left out."""
    from .engines import get_engine

    caps = get_engine(engine).capabilities
    flags = cpu_flags()
    out: list[tuple[str, str | None]] = []
    for p in FIDELITY_ORDER:
        if p not in caps.precisions or p in caps.gpu_only:
            continue
        note = None
        try:
            get_engine(engine).check_precision(p)
        except ArcdeployError as exc:
            note = str(exc)
        if note is None and p == "bf16" and not has_native_bf16():
            note = "no bf16 units on this CPU (AVX512_BF16 or AMX): a bf16 package would run f32"
        if note is None and p == "fp16" and not flags & FP16_FLAGS:
            note = "no native fp16 on this CPU (AVX512_FP16 or AMX-FP16): an fp16 package would run bf16 or f32"
        if note is None and p == "int8" and calib is None:
            note = "no calibration images (--calib)"
        if note is None and p == "int8" and flags and "avx2" not in flags:
            note = "no AVX2 on this CPU: int8 kernels are not faster than fp32 there"
        out.append((p, note))
    return out


def interleaved_speed(packages: dict[str, Path], faces: np.ndarray, threads: int | None = None) -> dict[str, dict]:
    """{name: {"images_per_s", "rounds"}}: every package on the same batch of aligned faces, in turns."""
    from .engines.base import StopRule, time_calls
    from .package import Package

    loaded = {k: Package(p, threads) for k, p in packages.items()}
    rates: dict[str, list[float]] = {k: [] for k in loaded}
    try:
        for rnd in range(SPEED_ROUNDS):
            keys = list(loaded)
            keys = keys[rnd % len(keys) :] + keys[: rnd % len(keys)]
            for k in keys:
                pkg = loaded[k]
                fixed = pkg.manifest.fixed_batch or SPEED_BATCH
                x = pkg.to_model_input(np.resize(faces, (fixed, *faces.shape[1:])))

                def one(runtime=pkg.runtime, x=x) -> None:
                    runtime.infer(x)

                lat, wall = time_calls(one, warmup=1 if rnd == 0 else 0, stop=StopRule(None, SPEED_SECONDS, 2))
                rates[k].append(len(lat) * len(x) / wall)
    finally:
        for pkg in loaded.values():
            pkg.runtime.close()
    return {
        k: {"images_per_s": round(statistics.median(v), 2), "rounds": [round(r, 2) for r in v]}
        for k, v in rates.items()
    }


def choose(results: dict[str, dict], skipped: dict[str, str] | None = None) -> PrecisionChoice:
    """The choice from each built candidate's ``{"images_per_s", "rounds", "passed", "worst_group",
    "cosine": {"mean", "min"}}`` (``rounds``: per-round img/s, for ratios within a round)."""
    skipped = skipped or {}
    base = results.get("fp32", {}).get("rounds")
    cands = []
    for p in FIDELITY_ORDER:
        if p in results:
            r = results[p]
            ratio = (
                round(statistics.median(a / b for a, b in zip(r["rounds"], base)), 3)
                if base and r.get("rounds")
                else None
            )
            cos = r.get("cosine") or {}
            cands.append(
                PrecisionCandidate(
                    precision=p,
                    images_per_s=r.get("images_per_s"),
                    vs_fp32=ratio,
                    passed=r.get("passed"),
                    worst_group=r.get("worst_group"),
                    cosine_mean=cos.get("mean"),
                    cosine_min=cos.get("min"),
                    note=r.get("note"),
                )
            )
        elif p in skipped:
            cands.append(PrecisionCandidate(precision=p, note=skipped[p]))
    timed = [c for c in cands if c.passed and c.images_per_s]
    if not timed:
        raise ArcdeployError(
            "precision auto: no candidate met its fidelity floor on every group of the check images: "
            + "; ".join(f"{c.precision}: {c.note or c.worst_group or 'not built'}" for c in cands)
        )
    fastest = max(timed, key=lambda c: c.images_per_s or 0.0)
    chosen = next(c for c in timed if (c.images_per_s or 0.0) * SAME_SPEED >= (fastest.images_per_s or 0.0))
    why = _why(chosen, fastest, cands)
    return PrecisionChoice(
        chosen=chosen.precision,
        why=why,
        candidates=tuple(cands),
        how=HOW,
        cpu=cpu_name(),
        flags=tuple(relevant_flags()),
    )


def _why(chosen: PrecisionCandidate, fastest: PrecisionCandidate, cands: list[PrecisionCandidate]) -> str:
    def speed(c: PrecisionCandidate) -> str:
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


def _result_of(pkg_dir: Path) -> dict:
    m = read_package_manifest(pkg_dir)
    fid = m.fidelity or {}
    grouped = m.fidelity_groups
    return {
        "passed": bool(fid.get("passed")) and (grouped is None or grouped.passed),
        "worst_group": grouped.worst if grouped else None,
        "cosine": {k: fid.get("cosine", {}).get(k) for k in ("mean", "min")},
    }


def build_auto(src, out, engine: str = "openvino", force: bool = False, **kwargs: Any) -> Path:
    """Build every candidate for this CPU, check each on the same faces by group, time them in turns,
    and write the chosen package to ``out`` with the choice in its manifest."""
    from . import build
    from .builder import CheckImages
    from .engines.registry import DEFAULT_ENGINE
    from .faces.calibration import calibration_split, load_images
    from .fidelity_groups import labels_of_image_set
    from .sources import resolve_export

    engine = engine or DEFAULT_ENGINE
    out = Path(out)
    refuse_existing(out, force)
    calib = kwargs.pop("calib", None)
    calib_landmarks = kwargs.get("calib_landmarks")
    plan = candidates(engine, calib)
    skipped = {p: note for p, note in plan if note}
    wanted = [p for p, note in plan if note is None]
    log.info("precision auto on %s: candidates %s", cpu_name(), ", ".join(wanted))
    started = time.time()
    with scratch_dir("auto") as work:
        export_dir = resolve_export(src, work, kwargs.pop("arch", "auto"), **(kwargs.pop("onnx_options", None) or {}))
        # one set of check faces for every candidate: the user's, else those an int8 build holds out
        check_images = kwargs.pop("check_images", None)
        if check_images is not None and not isinstance(check_images, CheckImages):
            got = load_images(
                check_images,
                kwargs.pop("check_landmarks", None),
                limit=kwargs.pop("check_count", None),
                what="check images",
            )
            check_images = CheckImages(got.faces, got.source, got.source, labels_of_image_set(got))
        elif check_images is None and calib is not None:
            from .quantize import DEFAULT_CALIBRATION_COUNT

            split = calibration_split(
                calib,
                calib_landmarks,
                count=kwargs.get("calib_count") or DEFAULT_CALIBRATION_COUNT,
                detector=kwargs.get("calib_detector"),
            )
            if split.holdout is not None:
                h = split.holdout.head(kwargs.get("check_count"))
                check_images = CheckImages(
                    h.faces, f"held-out calibration images ({h.source})", h.source, labels_of_image_set(h)
                )
        results: dict[str, dict] = {}
        built: dict[str, Path] = {}
        for p in wanted:
            try:
                built[p] = build(
                    export_dir,
                    work / p,
                    engine=engine,
                    precision=p,
                    calib=calib if p == "int8" else None,
                    check_images=check_images,
                    **kwargs,
                )
                results[p] = _result_of(built[p])
            except ArcdeployError as exc:
                skipped[p] = f"build failed: {describe(exc)}"
                log.warning("precision auto: %s not built: %s", p, describe(exc))
        if not built:
            raise ArcdeployError("precision auto: no candidate could be built: " + "; ".join(skipped.values()))
        faces = check_images.faces if isinstance(check_images, CheckImages) else None
        if faces is None or len(faces) == 0:
            faces = np.random.default_rng(0).integers(0, 256, (SPEED_BATCH, 112, 112, 3), dtype=np.uint8)
        speeds = interleaved_speed(built, faces[:SPEED_BATCH], kwargs.get("threads"))
        for p, s in speeds.items():
            results[p].update(s)
        choice = choose(results, skipped)
        log.info("precision auto: %s", choice.why)
        chosen = built[choice.chosen]
        with atomic_dir(out, force=force) as tmp:
            for f in chosen.iterdir():
                shutil.move(str(f), tmp / f.name)
            m = read_package_manifest(tmp)
            m.requested_precision = "auto"
            m.precision_choice = choice
            m.build_seconds = round(time.time() - started, 1)
            write_json_atomic(tmp / MANIFEST_NAME, m.to_json())
    return out
