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

import functools
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Generic, TypeVar

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


M = TypeVar("M")  # what a search measures on its validation inputs


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from .fidelity import cosine_rows

    return cosine_rows(a, b)


def validation_target(floor: dict[str, float]) -> dict[str, float]:
    """What the validation faces must reach: the floor plus a margin (the check faces are other
    people), the margin never more than half the room left below a cosine of 1, so no floor is
    made unreachable (a floor of 0.999 asks 0.9995, not 1.002)."""
    margins = {"mean": MEAN_MARGIN, "min": MIN_MARGIN}
    return {k: v + min(margins.get(k, 0.0), (1.0 - v) / 2) for k, v in floor.items()}


def _meets(cos: np.ndarray, floor: dict[str, float]) -> bool:
    stats = {"mean": float(cos.mean()), "min": float(cos.min())}
    return all(stats[k] >= v for k, v in validation_target(floor).items() if k in stats)


class LayerSearch(Generic[M]):
    """An int8 model with chosen layers back in float, searched for the fewest that meet a goal.

    ``rank_score(names)``: how good the model is with ``names`` in float (higher is better; on a
    few inputs, once per layer); ``measure(names)``: the full validation result (memoised by prefix
    length); ``meets(result)``: the goal; ``describe(result)``: its figures, for the log and the
    manifest. Recognition scores by cosine to fp32 (:func:`keep_sensitive_layers_float`), a
    detector by its landmarks' error (:mod:`arcdeploy.detector_fallback`)."""

    def __init__(
        self,
        layers: list[str],
        rank_score: Callable[[list[str]], float],
        measure: Callable[[list[str]], M],
        meets: Callable[[M], bool],
        describe: Callable[[M], dict[str, float]],
    ):
        self.layers, self.rank_score, self.measure = list(layers), rank_score, measure
        self.meets, self.describe = meets, describe
        self.tried: dict[int, M] = {}
        self.order: list[str] = []

    def rank(self, base: float | None = None) -> tuple[list[tuple[float, str]], int]:
        """Each layer back in float alone, by its gain in ``rank_score`` (best first); and how
        many layers were candidates. ``base``: the score with no layer in float, when known."""
        base = self.rank_score([]) if base is None else base
        gains = [(self.rank_score([name]) - base, name) for name in self.layers]
        gains.sort(reverse=True)
        self.order = [name for _, name in gains]
        return gains, len(self.layers)

    def reordered(self, order: list[str]) -> LayerSearch[M]:
        """The same search over the same layers taken in another ``order`` (its own prefixes)."""
        other = LayerSearch(self.layers, self.rank_score, self.measure, self.meets, self.describe)
        other.order = list(order)
        other.tried[0] = self.tried[0] if 0 in self.tried else other.measure([])
        return other

    def prefix(self, k: int) -> M:
        if k not in self.tried:
            self.tried[k] = got = self.measure(self.order[:k])
            figures = " ".join(f"{key} {value:.5f}" for key, value in self.describe(got).items())
            log.info("fallback: %d most sensitive layer(s) in float: validation %s", k, figures)
        return self.tried[k]

    def shortest_passing_prefix(self) -> int:
        """The fewest most-sensitive layers whose return to float meets the goal on the validation
        inputs (all of them when none does)."""
        order, k = self.order, 0
        for k in range(1, min(ONE_BY_ONE, len(order)) + 1):  # one layer at a time
            if self.meets(self.prefix(k)):
                return k
        lo = k
        while k < len(order) and not self.meets(self.prefix(k)):  # doubling ...
            lo, k = k, min(2 * k, len(order))
        while k - lo > 1:  # ... then bisecting between the last miss and the first pass
            mid = (lo + k) // 2
            if self.meets(self.prefix(mid)):
                k = mid
            else:
                lo = mid
        return k


def _median_cost(costs: dict[str, float]) -> float | None:
    """The middle of the measured (positive) costs, the upper one of an even count; None if none."""
    measured = sorted(c for c in costs.values() if c > 0)
    return measured[len(measured) // 2] if measured else None


def by_gain_per_cost(gains: list[tuple[float, str]], costs: dict[str, float]) -> list[str]:
    """Layers ordered by sensitivity gained per millisecond of float (``gains``: (gain, name) as
    :meth:`LayerSearch.rank` gives them; ``costs``: name -> ms, for some of them). Layers that gain
    nothing, or whose cost was not measured or measured as none (unseen by the counters, not free),
    keep their order after those ranked; a cost under a tenth of the median cost counts as that
    tenth, so a nearly free layer leads by what it gains, not by a division by almost nothing."""
    median = _median_cost(costs)
    least = 0.1 * median if median else 1.0
    helpful = [(g / max(costs[n], least), n) for g, n in gains if g > 0 and costs.get(n, 0.0) > 0]
    helpful.sort(key=lambda t: -t[0])
    ranked = {n for _, n in helpful}
    return [n for _, n in helpful] + [n for _, n in gains if n not in ranked]


DEAR = 3.0  # a layer whose float costs more than this many times the median layer's is dear


def dear_last(gains: list[tuple[float, str]], costs: dict[str, float]) -> list[str]:
    """The ranking by gain (``gains`` as :meth:`LayerSearch.rank` gives them) with its dear layers
    (measured float cost over ``DEAR`` times the median measured cost) moved to the end, in their
    order. Steadier than the order by gain per millisecond: it needs the costs only to tell a
    layer several times dearer than most, not to rank the cheap ones, whose costs are a few
    hundredths of a millisecond apart and move with the machine's noise."""
    median = _median_cost(costs)
    dear = {n for n, c in costs.items() if median and c > DEAR * median}
    return [n for _, n in gains if n not in dear] + [n for _, n in gains if n in dear]


def _cosine_figures(cos: np.ndarray) -> dict[str, float]:
    return {"mean": float(cos.mean()), "min": float(cos.min())}


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
    x = _inputs(job, val_faces)
    reverter = engine.reverter(job)
    ref = Reference(Package(job.out_dir), threads).embed(val_faces)

    def cosines(names: list[str], n: int | None = None) -> np.ndarray:
        k = len(x) if n is None else n
        return _cosine(reverter.embed(names, x[:k]), ref[:k])

    search = LayerSearch(
        reverter.layers(),
        rank_score=lambda names: float(cosines(names, RANKING_FACES).mean()),
        measure=cosines,
        meets=lambda cos: _meets(cos, floor),
        describe=_cosine_figures,
    )
    before = search.prefix(0)
    gains, candidates = search.rank(float(before[:RANKING_FACES].mean()))  # the ranking faces lead ``x``
    k = search.shortest_passing_prefix()
    kept = search.order[:k]
    after = search.prefix(k)
    nothing_left = nothing_int8_left(len(kept), len(search.order), _meets(after, floor))
    if not kept:
        log.warning("fallback: no quantized layer to put back in float; the recipe's package is kept")
    else:
        speed = _rebuild(engine, job, kept, x, threads)
        job.manifest.calibration = replace(
            job.manifest.calibration,
            fallback={
                "why": "the recipe's package missed the fidelity floor on the check images",
                "kept_float": kept,
                "ranking": [{"layer": n, "gain": round(g, 6)} for g, n in gains[: max(len(kept), 10)]],
                "prefixes_tried": {str(n): _cosine_figures(c) for n, c in sorted(search.tried.items()) if n},
                "candidates": candidates,
                "validation_faces": int(len(x)),
                "validation_before": _cosine_figures(before),
                "validation_after": _cosine_figures(after),
                "seconds": round(time.time() - started, 1),
                "speed": speed,
                **({"no_int8_left": True} if nothing_left else {}),
            },
        )
        write_json_atomic(job.out_dir / MANIFEST_NAME, job.manifest.to_json())
    result = check(
        job.out_dir,
        images=images.faces,
        threads=threads,
        images_label=images.label,
        images_source=images.source,
        floor=floor,
        labels=images.labels,
    )
    if nothing_left:  # said where the verdict is read: the build's summary, the manifest, --strict
        log.warning("fallback: %s", nothing_left)
        result.below_floor.append(nothing_left)
    return result


RECOGNITION_REMEDY = "build fp32 or bf16 instead, or allow a larger --max-cosine-drop"


def nothing_int8_left(kept: int, candidates: int, reached: bool, remedy: str = RECOGNITION_REMEDY) -> str | None:
    """When a fallback keeps every quantized layer in float, no int8 package is left, only an fp32
    one under an int8 label at a fraction of the speed: what the build says of it then (it counts as
    below the floor, so ``--strict`` refuses it), else None. ``remedy``: what the user can do (a
    detector build has no ``--max-cosine-drop``)."""
    if not candidates or kept < candidates:
        return None
    missed = "" if reached else ", and still misses the floor"
    return f"no int8 layer left: all {candidates} quantized layers went back to float{missed}; {remedy}"


def _rebuild(engine, job, kept: list[str], x: np.ndarray, threads: int | None) -> dict:
    """The package quantized again, cleanly, with ``kept`` in the recipe's float scope (the manifest's
    calibration entry keeps what the images were); what that costs in speed."""
    previous = job.manifest.calibration  # includes what the calibration images were
    with scratch_dir("fallback") as recipe_pkg:
        # the recipe's package steps aside (not deleted) so its speed can be compared with the new one's
        move_engine_files(job, recipe_pkg)
        write_json_atomic(recipe_pkg / MANIFEST_NAME, job.manifest.to_json())
        # rebuilt.manifest is job.manifest: the build writes its new entries there
        rebuilt = requantize(engine, job, kept)
        rebuilt.manifest.calibration = rebuilt.manifest.calibration.with_images_of(previous)
        write_json_atomic(job.out_dir / MANIFEST_NAME, rebuilt.manifest.to_json())
        return _speed_cost(recipe_pkg, job.out_dir, x, threads)


def move_engine_files(job, to: Path) -> None:
    """The engine files a build wrote into ``job.out_dir``, moved to ``to``."""
    for f in list(job.out_dir.iterdir()):
        if f.is_file() and f.name in set(job.manifest.files.values()):
            shutil.move(str(f), to / f.name)


def requantize(engine, job, kept: list[str]):
    """``job`` quantized again, cleanly (a new calibration), with ``kept`` in its recipe's float scope."""
    rebuilt = replace(job, recipe=job.recipe.with_float_layers(kept), warnings=[])
    engine.build(rebuilt)
    return rebuilt


def _speed_cost(recipe_pkg: Path, new_pkg: Path, x: np.ndarray, threads: int | None) -> dict:
    """Images/s of the recipe's int8 package and of the package with the kept layers in float,
    timed in turns (the median over rounds; one batch of validation faces), and their ratio."""
    from .package import Package

    pkgs = {"recipe": Package(recipe_pkg, threads), "fallback": Package(new_pkg, threads)}
    batch = x[: pkgs["fallback"].manifest.fixed_batch or 16]
    calls = {key: functools.partial(pkg.runtime.infer, batch) for key, pkg in pkgs.items()}
    record = speed_in_turns(calls, len(batch), "images", "package", SPEED_ROUNDS, SPEED_SECONDS)
    for pkg in pkgs.values():
        pkg.runtime.close()
    return record


def speed_in_turns(calls: dict, batch: int, unit: str, what: str, rounds: int, seconds: float) -> dict:
    """The speed record of a fallback: ``calls["recipe"]`` and ``calls["fallback"]`` (each runs one
    batch of ``batch`` ``unit``) timed in turns, ``rounds`` of ``seconds`` each; their median rates
    and the median of the rounds' ratios."""
    from .engines.base import interleaved_rates

    rates = interleaved_rates(calls, dict.fromkeys(calls, batch), rounds, seconds, min_runs=2)
    ratio = statistics.median(a / b for a, b in zip(rates["fallback"], rates["recipe"]))
    log.info("fallback: the %s keeps %.0f%% of the recipe's int8 speed", what, 100 * ratio)
    return {
        "batch": int(batch),
        f"recipe_{unit}_per_s": round(statistics.median(rates["recipe"]), 2),
        f"fallback_{unit}_per_s": round(statistics.median(rates["fallback"]), 2),
        "fallback_vs_recipe": round(ratio, 3),
        "how": f"median of {rounds} rounds of {seconds:g} s per {what}, taken in turns, at build time",
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
