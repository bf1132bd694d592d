"""Accuracy-aware int8 fallback for detector packages: the recognition fallback's search
(:class:`arcdeploy.fallback.LayerSearch`) scored in a detector's terms.

When an int8 detector package misses its fidelity floor on the check photos, its most sensitive
layers go back to float until validation photos meet the floor with a margin:

1. Validation photos come from the calibration photos (never from the check photos): the ones
   with the most faces the source finds (small faces are where int8 moves the points most), then
   others spread over the set. Their faces from the source ONNX (ONNX Runtime fp32) are found once.
2. Rank: each quantized layer is put back in float alone (the engine's ``reverter``: its input
   quantizer bypassed, its fp32 weights restored) and the fall of the landmark error (mean share of
   the inter-ocular distance over the faces of the first ``RANKING_PHOTOS``) is its sensitivity.
3. Search: the shortest prefix of that ranking whose layers, back in float, let the validation
   photos meet what the check photos missed of :data:`~arcdeploy.detector_check.FLOOR`, with
   its landmark errors times ``MARGIN`` (:func:`validation_goal`; one layer at a time first, then
   doubling and bisecting, as for recognition). Only what was missed: the largest error of one
   validation face drove an earlier version to 16 layers where the check had missed the mean alone.
   Searched again where the engine can time its layers (OpenVINO's per-node counters: each
   layer's milliseconds per canvas in float less those in int8, one thread, two compiles): along
   the ranking by gain with its dear layers last, and along the ranking by gain per millisecond;
   of the passing sets, the one whose model runs fastest (timed in turns) is kept
   (:func:`_cheapest_order`).
4. The package is quantized again, cleanly, with those layers in the recipe's float scope; the
   build checks it on the check photos as every build is. The manifest's calibration entry records
   the layers, the ranking, the validation figures before and after, the seconds it took and the
   detector's speed against the recipe's package (timed in turns on the same canvases).

Unlike a recognition network, where one or two layers carry the loss, SCRFD's error is spread over
its layers (the most sensitive of SCRFD-500M's 43 carries 13% of it), and float layers at the
canvas's full resolution cost speed: on the benchmark's build (benchmarks/bench_photos.py: 60 LFW
photos and 4 group photos, checked on the real photos and a group photo, AVX-512 VNNI CPU) the mean
error of the group photo's small faces fell from 1.4% to 0.90% of their IOD with 5 layers in float,
for a detector at 0.84x the recipe's speed; hence the speed is recorded beside the layers, and
the search is run along orders that weigh each layer's cost too (step 3). The dearest of those five
(a 3x3 convolution at 1/8 of the canvas, 1.5 ms of float a canvas) gains about what cheap ones
gain for a tenth of that: with the dear layers last the same build keeps 5 others costing 0.9-1.0
ms of float instead of 2.3, and its check photos' error is 0.79% of the IOD (mean) against 0.77%.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import numpy as np

from .errors import ArcdeployError
from .files import scratch_dir
from .manifest import DetectorFidelity

log = logging.getLogger(__name__)

VALIDATION_PHOTOS = 24
CROWDED_PHOTOS = 8  # of them, at most this many chosen for having the most faces
RANKING_PHOTOS = 12  # each layer's sensitivity is measured on these (one compile + run per layer)
MARGIN = 0.8  # validation landmark errors must be under the floor's times this: the check photos are others
SPEED_ROUNDS = 3
SPEED_SECONDS = 1.0


class _RunnerSession:
    """A detector's session replaced by a reverter's model (``run(canvases) -> every output``)."""

    def __init__(self, run):
        self._run = run

    def run(self, feed: dict) -> list[np.ndarray]:
        (x,) = feed.values()
        return self._run(x)


def validation_photos(found: list, threshold: float) -> list[int]:
    """Up to ``VALIDATION_PHOTOS`` of the calibration photos, by index, given the faces the reference
    finds in each (``found``): those with the most faces over ``threshold`` first (at most
    ``CROWDED_PHOTOS``, with two faces or more), then the others spread evenly over the set."""
    counts = [sum(f.score >= threshold for f in faces) for faces in found]
    crowded = sorted((i for i, c in enumerate(counts) if c >= 2), key=lambda i: -counts[i])[:CROWDED_PHOTOS]
    rest = [i for i in range(len(found)) if i not in set(crowded) and counts[i] >= 1]
    room = min(VALIDATION_PHOTOS - len(crowded), len(rest))
    spread = [rest[k * len(rest) // room] for k in range(room)] if room > 0 else []
    return crowded + spread


def validation_goal(floor: dict, missed: DetectorFidelity) -> dict:
    """What the validation photos must reach: for each part of the floor the check photos missed
    (box IoU, the landmarks' mean error, their max on faces of a useful size) the floor with a
    margin (errors times ``MARGIN``); the parts they met are not asked again (the package is checked
    on them once more after the fallback). No face lost or added, always."""
    return {
        "iou": floor["iou"] if missed.min_iou < floor["iou"] else 0.0,
        "landmark_error_mean": floor["landmark_error_mean"] * MARGIN
        if missed.landmark_error_mean > floor["landmark_error_mean"]
        else float("inf"),
        "landmark_error_max": floor["landmark_error_max"] * MARGIN
        if missed.landmark_error_max_judged > floor["landmark_error_max"]
        else float("inf"),
    }


def _figures(f: DetectorFidelity) -> dict[str, float]:
    return {
        "landmark_error_mean": f.landmark_error_mean,
        "landmark_error_max_judged": f.landmark_error_max_judged,
        "min_iou": f.min_iou,
        "lost": f.lost,
        "added": f.added,
    }


def keep_sensitive_layers_float(
    engine, job, reference, photos: list, floor: dict, missed: DetectorFidelity, threads
) -> tuple[dict, str | None]:
    """Requantize the int8 detector build ``job`` (written into ``job.out_dir``, which holds a
    detector manifest) with its most sensitive layers in float (module doc). Returns the record for
    the manifest's calibration entry (``"fallback"``), and what the build must say when no int8 layer
    is left (else None). ``photos``: the calibration photos; ``missed``: the check that missed
    ``floor`` (what it missed is what the validation photos must reach)."""
    from .detector_check import reference_faces
    from .fallback import move_engine_files, nothing_int8_left, requantize

    if engine.reverter is None:
        raise ArcdeployError(f"engine {engine.name}: no accuracy-aware fallback for its int8 packages")
    started = time.time()
    found = reference_faces(reference, photos)  # once: they choose the validation photos and score them
    chosen = validation_photos(found, reference.threshold)
    if not chosen:
        raise ArcdeployError("the detector fallback found no face in the calibration photos to validate on")
    val, ref_found = [photos[i] for i in chosen], [found[i] for i in chosen]
    target = validation_goal(floor, missed)
    reverter = engine.reverter(job)
    search, candidate = _layer_search(reverter, job.out_dir, reference, val, ref_found, target, threads)
    canvases = candidate.canvas(val[0])[0][None]
    before = search.prefix(0)
    record: dict = {
        "why": "the recipe's package missed the fidelity floor on the check photos",
        "candidates": len(search.layers),
        "validation_photos": len(val),
        "validation_faces": int(sum(len(f) for f in ref_found)),
        "validation_target": {k: v for k, v in target.items() if 0 < v < float("inf")},
        "validation_before": _figures(before),
    }
    if search.meets(before):  # nothing to learn from them: the check photos' faces are unlike these
        log.warning(
            "detector fallback: the calibration photos already meet the floor; the check photos hold faces "
            "unlike them (small faces?): calibrate on photos like the ones the detector will see"
        )
        nothing = "the calibration photos already meet the floor"
        return {**record, "kept_float": [], "validation_after": _figures(before), "nothing_to_do": nothing}, None
    gains, _ = search.rank()
    k = search.shortest_passing_prefix()
    kept, after = search.order[:k], search.prefix(k)
    costs = _float_costs(reverter, [n for g, n in gains if g > 0], canvases)
    if costs:
        timer = functools.partial(_time_sets, reverter, canvases)
        search, kept, after, record["orders"] = _cheapest_order(search, kept, after, gains, costs, timer)
    record["kept_float"] = kept
    record["ranking"] = [
        {"layer": n, "gain": round(g, 6), **({"float_ms": round(costs[n], 3)} if n in costs else {})}
        for g, n in gains[: max(len(kept), 10)]
    ]
    record["prefixes_tried"] = {str(n): _figures(f) for n, f in sorted(search.tried.items()) if n}
    record["validation_after"] = _figures(after)
    nothing_left = nothing_int8_left(len(kept), len(search.layers), after.passed, remedy="build fp32 or bf16 instead")
    if nothing_left:
        record["no_int8_left"] = True
        log.warning("detector fallback: %s", nothing_left)
    if kept:
        with scratch_dir("detector-fallback") as recipe_files:
            move_engine_files(job, recipe_files)  # aside, not deleted: its speed is compared with the new one's
            requantize(engine, job, kept)  # job.manifest (the scratch one) takes the new build's entries
            record["speed"] = _speed_cost(engine.name, recipe_files, job, canvases)
    record["seconds"] = round(time.time() - started, 1)
    return record, nothing_left


def _time_sets(reverter, canvases: np.ndarray, sets: dict[str, list[str]]) -> dict[str, float]:
    """Canvases/s of the model with each set of layers in float (the reverter's), timed in turns."""
    from .engines.base import interleaved_rates

    calls = {name: functools.partial(reverter.runner(names), canvases) for name, names in sets.items()}
    rates = interleaved_rates(calls, dict.fromkeys(calls, len(canvases)), SPEED_ROUNDS, SPEED_SECONDS, min_runs=2)
    return {name: float(np.median(r)) for name, r in rates.items()}


def _float_costs(reverter, layers: list[str], canvases: np.ndarray) -> dict[str, float]:
    """Each layer's milliseconds in float less the int8 model's, one canvas per call on the
    pipeline's detector threads; empty where the engine cannot time its layers."""
    from .faces.detectors.registry import DETECTOR_THREADS

    timer = getattr(reverter, "float_costs", None)
    return timer(layers, canvases, threads=DETECTOR_THREADS) if timer is not None else {}


def _cheapest_order(search, kept: list[str], after, gains, costs: dict[str, float], timer=None):
    """The layers to keep in float, searched again along other orders of the ranking (SCRFD's error
    is spread over many layers, and the most sensitive of them can be the dearest: a 3x3
    convolution at 1/8 of the canvas costs several cheap ones): by gain with the dear layers last
    (:func:`arcdeploy.fallback.dear_last`), and by gain per millisecond
    (:func:`arcdeploy.fallback.by_gain_per_cost`). Of the passing sets the fastest is kept:
    ``timer({order: layers})`` -> canvases/s of each set's model, timed in turns; without one (or
    with one set) the least summed float cost. Summed per-layer costs alone mislead between sets
    of very different sizes (each layer's cost is taken with all of them in float: with the
    depthwise layers quantized too, 47 layers summed to less than 10). The order by gain wins a tie.
    Returns (search, kept, its validation figures, the record of every order for the manifest)."""
    from .fallback import by_gain_per_cost, dear_last

    def ms(names: list[str]) -> float:
        return round(sum(costs.get(n, 0.0) for n in names), 3)

    found = {"by gain": (search, kept, after)}
    alternatives = (
        ("by gain, dear layers last", dear_last(gains, costs)),
        ("by gain per ms", by_gain_per_cost(gains, costs)),
    )
    for name, order in alternatives:
        if any(order == s.order for s, _, _ in found.values()):
            continue  # the same order: the same answer
        other = search.reordered(order)
        k = other.shortest_passing_prefix()
        found[name] = (other, other.order[:k], other.prefix(k))
    record: dict[str, object] = {
        name: {"layers": len(names), "float_ms": ms(names), "passed": bool(s.meets(figures))}
        for name, (s, names, figures) in found.items()
    }
    passing = [name for name, (s, _, figures) in found.items() if s.meets(figures)] or ["by gain"]
    distinct: dict[str, list[str]] = {}  # a set found along two orders is timed once, under the first
    for name in passing:
        if found[name][1] not in distinct.values():
            distinct[name] = found[name][1]
    if timer is not None and len(distinct) > 1:
        rates = timer(distinct)
        for name, rate in rates.items():
            record[name]["canvases_per_s"] = round(rate, 2)  # type: ignore[index]
        best = max(distinct, key=lambda name: (rates[name], name == "by gain"))
        record["how"] = "the passing sets' models timed in turns, one canvas a call; the fastest kept"
    else:
        best = min(passing, key=lambda name: (ms(found[name][1]), name != "by gain"))
        record["how"] = "a layer's ms per canvas in float less in int8 (OpenVINO's node counters, one thread)"
    record["kept"] = best
    chosen, names, figures = found[best]
    return chosen, names, figures, record


def _layer_search(reverter, package_dir: Path, reference, val: list, ref_found: list, target: dict, threads):
    """The layer search over ``reverter``'s layers, scored by the detector's fidelity to ``reference``
    (whose faces in the validation photos ``val`` are ``ref_found``) against ``target``; and the
    package's detector, whose session the search replaces."""
    from .detector_check import detector_fidelity
    from .faces.detectors.registry import DetectorSpec
    from .faces.detectors.scrfd import ScrfdDetector
    from .fallback import LayerSearch

    k_rank = min(RANKING_PHOTOS, len(val))
    candidate = DetectorSpec(package_dir, threads=threads).open()  # its canvas and decoding; its session replaced
    if not isinstance(candidate, ScrfdDetector):
        raise ArcdeployError(f"{package_dir}: not an SCRFD detector package")

    def fidelity(names: list[str], n: int | None = None) -> DetectorFidelity:
        k = len(val) if n is None else n
        candidate.session = _RunnerSession(reverter.runner(names))
        return detector_fidelity(reference, candidate, val[:k], "validation", ref_found[:k], target)

    def rank_score(names: list[str]) -> float:
        f = fidelity(names, k_rank)
        return -f.landmark_error_mean - 0.01 * (f.lost + f.added)

    search = LayerSearch(
        reverter.layers(), rank_score=rank_score, measure=fidelity, meets=lambda f: f.passed, describe=_figures
    )
    return search, candidate


def _speed_cost(engine: str, recipe_files: Path, job, canvases: np.ndarray) -> dict:
    """Canvases/s of the recipe's int8 detector and of the one with the kept layers in float, as the
    photo pipeline runs a detector (one canvas per call, ``DETECTOR_THREADS`` engine threads), timed in
    turns (the median over rounds), and their ratio."""
    from .engines.registry import open_graph
    from .faces.detectors.registry import DETECTOR_THREADS
    from .fallback import speed_in_turns

    model = job.manifest.files["model"]
    hint = job.manifest.engine_config.get("inference_precision")
    sessions = {
        key: open_graph(folder / model, engine=engine, threads=DETECTOR_THREADS, precision_hint=hint)
        for key, folder in (("recipe", recipe_files), ("fallback", job.out_dir))
    }
    feed = {sessions["recipe"].inputs[0].name: canvases}
    calls = {key: functools.partial(s.run, feed) for key, s in sessions.items()}
    record = speed_in_turns(calls, len(canvases), "canvases", "detector", SPEED_ROUNDS, SPEED_SECONDS)
    record["how"] += ", as the photo pipeline calls it"
    return {**record, "threads": DETECTOR_THREADS}
