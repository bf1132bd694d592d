"""Accuracy-aware int8 fallback: when a build misses its fidelity floor, keep the layers that lose
the most in int8 in float, one by one, until it meets it.

1. Validation faces come from the calibration images (never from the faces the final check
   uses), and their fp32 embeddings from the package's own reference.
2. Rank: the int8 model is built once; each quantized layer is put back in float alone (its
   input quantizer bypassed, its fp32 weights restored: the engine's ``reverter``) and the gain
   in mean cosine to fp32 on the validation faces is its sensitivity.
3. Search: the shortest prefix of that ranking whose layers, back in float, let the validation
   faces clear the floor with a margin: one layer at a time first (a trained network usually
   loses its fidelity in one or two layers), then doubling and bisecting the prefix (an untrained
   or deep one loses a little everywhere), so the search costs a few compiles, not one per layer.
4. The package is quantized again, cleanly, with those layers in the recipe's float scope, and
   checked on the check images as every build is. The manifest records the layers, the ranking,
   the fidelity before and after, what it cost in build time, and what it costs in speed: the
   recipe's int8 package and the new one are timed in turns on the same inputs.

Measured on a trained MobileFaceNet with real faces, this picks the same single layer (the first
depthwise convolution) as NNCF's ``quantize_with_accuracy_control`` and takes the per-image cosine
from 0.985 to 0.995, in about 3/4 of its time.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import ArcdeployError
from .files import scratch_dir, write_json_atomic
from .manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

VALIDATION_FACES = 96
RANKING_FACES = 32  # faces each layer's sensitivity is measured on (one compile + run per layer)
MEAN_MARGIN = 0.003  # validation must clear the floor by these margins: the check faces are other people
MIN_MARGIN = 0.005
ONE_BY_ONE = 4  # the first layers are tried one at a time
SPEED_ROUNDS = 3  # the speed cost: rounds of SPEED_SECONDS per package, taken in turns
SPEED_SECONDS = 1.0


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from .fidelity import cosine_rows

    return cosine_rows(a, b)


def _meets(cos: np.ndarray, floor: dict[str, float]) -> bool:
    stats = {"mean": float(cos.mean()), "min": float(cos.min())}
    margins = {"mean": MEAN_MARGIN, "min": MIN_MARGIN}
    return all(stats[k] >= v + margins.get(k, 0.0) for k, v in floor.items() if k in stats)


def keep_sensitive_layers_float(engine, job, split, images, floor: dict[str, float], threads: int | None = None):
    """Rebuild ``job`` (an int8 build that missed ``floor``) with its most sensitive layers in float;
    returns the new :class:`~arcdeploy.fidelity.FidelityResult` on ``images``."""
    from .fidelity import Reference, check
    from .package import Package

    if engine.reverter is None:
        raise ArcdeployError(f"engine {engine.name}: no accuracy-aware fallback for its int8 packages")
    started = time.time()
    faces = split.calib.faces
    val_faces = faces[:: max(1, len(faces) // VALIDATION_FACES)][:VALIDATION_FACES]
    pkg = Package(job.out_dir)
    ref = Reference(pkg, threads).embed(val_faces)
    x = _inputs(job, val_faces)
    rev = engine.reverter(job)

    def final_check():
        return check(
            job.out_dir,
            images=images.faces,
            threads=threads,
            images_label=images.label,
            images_source=images.source,
            floor=floor,
            labels=images.labels,
        )

    def cosines(names: list[str], n: int | None = None) -> np.ndarray:
        k = len(x) if n is None else n
        return _cosine(rev.embed(names, x[:k]), ref[:k])

    before = cosines([])
    base_rank = float(before[:RANKING_FACES].mean())
    candidates = rev.layers()
    gains = []
    for name in candidates:
        gains.append((float(cosines([name], RANKING_FACES).mean()) - base_rank, name))
    gains.sort(reverse=True)
    order = [name for _, name in gains]
    tried: dict[int, np.ndarray] = {}

    def prefix(k: int) -> np.ndarray:
        if k not in tried:
            tried[k] = cosines(order[:k])
            log.info(
                "fallback: %d most sensitive layer(s) in float: validation cosine mean %.5f min %.5f",
                k,
                tried[k].mean(),
                tried[k].min(),
            )
        return tried[k]

    k = 0
    for k in range(1, min(ONE_BY_ONE, len(order)) + 1):  # one layer at a time
        if _meets(prefix(k), floor):
            break
    else:
        lo = k
        while k < len(order) and not _meets(prefix(k), floor):  # doubling ...
            lo, k = k, min(2 * k, len(order))
        while k - lo > 1:  # ... then bisecting between the last miss and the first pass
            mid = (lo + k) // 2
            if _meets(prefix(mid), floor):
                k = mid
            else:
                lo = mid
    kept = order[:k]
    after = prefix(k) if k else before
    if kept and not _meets(after, floor):
        log.warning(
            "fallback: even with all %d quantized layers in float the validation faces miss the floor", len(order)
        )
    if not kept:
        log.warning("fallback: no quantized layer to put back in float; the recipe's package is kept")
        return final_check()

    previous = dict(job.manifest.calibration or {})  # includes what the calibration images were
    recipe = job.recipe.with_float_layers(kept)
    with scratch_dir("fallback") as recipe_pkg:
        # the recipe's package steps aside (not deleted) so its speed can be compared with the new one's
        for f in list(job.out_dir.iterdir()):
            if f.is_file() and f.name in set(job.manifest.files.values()):
                shutil.move(str(f), recipe_pkg / f.name)
        write_json_atomic(recipe_pkg / MANIFEST_NAME, job.manifest.to_json())
        rebuilt = replace(job, recipe=recipe, warnings=[])
        engine.build(rebuilt)
        write_json_atomic(job.out_dir / MANIFEST_NAME, rebuilt.manifest.to_json())
        speed = _speed_cost(recipe_pkg, job.out_dir, x, threads)
    job.manifest.calibration = {
        **previous,
        **(rebuilt.manifest.calibration or {}),
        "fallback": {
            "why": "the recipe's package missed the fidelity floor on the check images",
            "kept_float": kept,
            "ranking": [{"layer": n, "gain": round(g, 6)} for g, n in gains[: max(len(kept), 10)]],
            "prefixes_tried": {
                str(n): {"mean": float(c.mean()), "min": float(c.min())} for n, c in sorted(tried.items())
            },
            "candidates": len(candidates),
            "validation_faces": int(len(x)),
            "validation_before": {"mean": float(before.mean()), "min": float(before.min())},
            "validation_after": {"mean": float(after.mean()), "min": float(after.min())},
            "seconds": round(time.time() - started, 1),
            "speed": speed,
        },
    }
    write_json_atomic(job.out_dir / MANIFEST_NAME, job.manifest.to_json())
    return final_check()


def _speed_cost(recipe_pkg: Path, new_pkg: Path, x: np.ndarray, threads: int | None) -> dict:
    """Images/s of the recipe's int8 package and of the package with the kept layers in float,
    timed in turns (the median over rounds; one batch of validation faces), and their ratio."""
    from .engines.base import StopRule, time_calls
    from .package import Package

    pkgs = {"recipe": Package(recipe_pkg, threads), "fallback": Package(new_pkg, threads)}
    batch = x[: pkgs["fallback"].manifest.fixed_batch or 16]
    rates: dict[str, list[float]] = {k: [] for k in pkgs}
    for rnd in range(SPEED_ROUNDS):
        for key in list(pkgs) if rnd % 2 == 0 else list(reversed(pkgs)):
            runtime = pkgs[key].runtime

            def one_batch(runtime=runtime) -> None:
                runtime.infer(batch)

            lat, wall = time_calls(one_batch, warmup=1 if rnd == 0 else 0, stop=StopRule(None, SPEED_SECONDS, 2))
            rates[key].append(len(lat) * len(batch) / wall)
    for pkg in pkgs.values():
        pkg.runtime.close()
    ratio = statistics.median(a / b for a, b in zip(rates["fallback"], rates["recipe"]))
    log.info("fallback: the package keeps %.0f%% of the recipe's int8 speed", 100 * ratio)
    return {
        "batch": int(len(batch)),
        "recipe_images_per_s": round(statistics.median(rates["recipe"]), 2),
        "fallback_images_per_s": round(statistics.median(rates["fallback"]), 2),
        "fallback_vs_recipe": round(ratio, 3),
        "how": f"median of {SPEED_ROUNDS} rounds of {SPEED_SECONDS:g} s per package, taken in turns, at build time",
    }


def _inputs(job, faces: np.ndarray) -> np.ndarray:
    """Faces in the built model's own input format (folded preprocessing included), in whole
    batches when it was compiled for a fixed one (the last batch padded, its extra rows dropped later)."""
    x = job.manifest.input.to_model_input(faces)
    fixed = job.manifest.fixed_batch
    if fixed and len(x) % fixed:
        keep = len(x) - len(x) % fixed
        if keep == 0:
            raise ArcdeployError(f"the fallback needs at least {fixed} validation faces for a batch-{fixed} package")
        x = x[:keep]
    return x
