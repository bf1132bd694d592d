"""The accuracy-aware fallback's search (arcdeploy.fallback.LayerSearch), which recognition and
detector packages share, on hand-made measures whose answer is known."""

from __future__ import annotations

import pytest

from arcdeploy.detector_fallback import _cheapest_order
from arcdeploy.fallback import LayerSearch, by_gain_per_cost, dear_last


def _search(loss: dict[str, float], goal: float, calls: list | None = None) -> LayerSearch:
    """Layers whose return to float removes ``loss[name]`` of a total error; the goal: error <= ``goal``."""
    total = sum(loss.values())

    def error(names: list[str]) -> float:
        if calls is not None:
            calls.append(tuple(names))
        return total - sum(loss[n] for n in names)

    return LayerSearch(
        list(loss),
        rank_score=lambda names: -error(names),
        measure=error,
        meets=lambda e: e <= goal + 1e-12,
        describe=lambda e: {"error": e},
    )


def test_ranks_by_gain_and_finds_the_shortest_prefix_one_layer_at_a_time():
    search = _search({"a": 0.1, "b": 3.0, "c": 0.5, "d": 1.0}, goal=0.6)
    gains, candidates = search.rank()
    assert candidates == 4 and search.order == ["b", "d", "c", "a"]
    assert [round(g, 9) for g, _ in gains] == [3.0, 1.0, 0.5, 0.1]
    assert search.shortest_passing_prefix() == 2  # b and d: 4.6 - 4.0 = 0.6
    assert search.prefix(2) == pytest.approx(0.6) and search.prefix(1) == pytest.approx(1.6)


def test_gain_per_millisecond_orders_the_cheap_layers_first_and_the_unseen_and_useless_last():
    gains = [(3.0, "dear"), (1.0, "cheap"), (0.5, "fused b"), (0.4, "unseen"), (0.1, "fused a"), (0.0, "useless")]
    costs = {"dear": 6.0, "cheap": 1.0, "fused b": 0.009, "unseen": 0.0, "fused a": 0.001, "useless": 0.1}
    # median of the measured costs 0.1: a cost under 0.01 counts as 0.01, so "fused b" (0.5 / 0.01 = 50 per ms)
    # leads "fused a" (0.1 / 0.01 = 10; 100 by its own 0.001 ms), then cheap (1.0 per ms) and dear (0.5);
    # "unseen" (its cost measured as none) and "useless" keep their order after them
    assert by_gain_per_cost(gains, costs) == ["fused b", "fused a", "cheap", "dear", "unseen", "useless"]
    assert by_gain_per_cost(gains, {}) == [n for _, n in gains]  # nothing measured: the order by gain


def test_dear_layers_go_last_and_nothing_else_moves():
    gains = [(3.0, "dear"), (1.0, "a"), (0.5, "b"), (0.2, "unmeasured"), (0.1, "c")]
    costs = {"dear": 1.5, "a": 0.3, "b": 0.2, "c": 0.4}  # median 0.4 (the upper middle): dear over 1.2
    assert dear_last(gains, costs) == ["a", "b", "unmeasured", "c", "dear"]
    assert dear_last(gains, {"dear": 1.0, "a": 0.5}) == [n for _, n in gains]  # 1.0 is not over 3 x 1.0
    assert dear_last(gains, {}) == [n for _, n in gains]


def test_the_cheapest_passing_set_of_the_orders_is_kept():
    """The most sensitive layer costs more than the two next together, which also reach the goal."""
    loss, costs = {"big": 3.0, "b": 1.6, "c": 1.5, "d": 0.1}, {"big": 5.0, "b": 1.0, "c": 1.0, "d": 1.0}
    search = _search(loss, goal=3.2)
    gains, _ = search.rank()
    kept = search.order[: search.shortest_passing_prefix()]
    after = search.prefix(len(kept))
    assert kept == ["big"]
    chosen, kept2, after2, orders = _cheapest_order(search, kept, after, gains, costs)
    assert kept2 == ["b", "c"] and after2 == pytest.approx(3.1) and chosen.meets(after2)
    assert orders["kept"] == "by gain, dear layers last"  # the first of two as cheap
    assert orders["by gain"] == {"layers": 1, "float_ms": 5.0, "passed": True}
    assert orders["by gain, dear layers last"] == {"layers": 2, "float_ms": 2.0, "passed": True}
    assert orders["by gain per ms"] == {"layers": 2, "float_ms": 2.0, "passed": True}
    # timed, the fastest passing set wins whatever the summed costs say (each distinct set timed once)
    timed: list = []

    def timer(sets):
        timed.append(sets)
        return {name: (50.0 if name == "by gain" else 40.0) for name in sets}

    chosen, kept4, _, orders = _cheapest_order(search, kept, after, gains, costs, timer)
    assert orders["kept"] == "by gain" and kept4 == ["big"] and chosen is search
    assert timed == [{"by gain": ["big"], "by gain, dear layers last": ["b", "c"]}]  # "per ms" found the same set
    assert orders["by gain"]["canvases_per_s"] == 50.0 and "timed in turns" in orders["how"]
    # when the dear layer is also the cheapest way there, no other order differs: the ranking by gain stays
    costs["big"] = 1.5
    chosen, kept3, _, orders = _cheapest_order(search, kept, after, gains, costs)
    assert orders["kept"] == "by gain" and kept3 == ["big"] and chosen is search
    assert set(orders) == {"by gain", "kept", "how"}


# total 40.5: 10.0 wants 30.5 removed (the first and 29 more), 16.5 wants 24 (the first and 23 more)
@pytest.mark.parametrize("goal, expected", [(10.0, 30), (16.5, 24), (0.0, 40)])
def test_a_loss_spread_over_many_layers_is_found_by_doubling_and_bisecting(goal, expected):
    """40 layers of 1.0 each but the first, of 1.5 (a loss spread everywhere, as in SCRFD or an untrained net)."""
    loss = {f"L{i}": 1.0 for i in range(40)} | {"L0": 1.5}
    calls: list = []
    search = _search(loss, goal, calls)
    search.rank()
    assert search.order[0] == "L0"
    k = search.shortest_passing_prefix()
    assert k == expected and search.meets(search.prefix(k)) and not search.meets(search.prefix(k - 1))
    measured = len(calls) - 41  # the ranking: the base and each layer alone
    assert measured <= 4 + 2 * 6  # one by one, then a few doublings and bisections, not one per layer


def test_detector_validation_photos_take_crowded_ones_first_then_a_spread():
    """The detector fallback validates on calibration photos: those with the most faces first (small
    faces are where int8 moves points most), then others spread over the set; none without a face."""
    from types import SimpleNamespace

    from arcdeploy import detector_fallback

    faces_per_photo = [1, 0, 5, 1, 1, 12, 1, 2, 1, 1] + [1] * 30
    face, faint = SimpleNamespace(score=0.9), SimpleNamespace(score=0.47)  # faint: under the threshold
    found = [[face] * n + [faint] for n in faces_per_photo]
    chosen = detector_fallback.validation_photos(found, 0.5)
    assert chosen[:3] == [5, 2, 7]  # 12, 5 and 2 faces
    assert len(chosen) == detector_fallback.VALIDATION_PHOTOS and len(set(chosen)) == len(chosen)
    assert 1 not in chosen and chosen[3] == 0 and max(chosen) >= 35  # spread to the end of the set


def test_detector_fallback_asks_the_validation_photos_what_the_check_missed():
    from arcdeploy import detector_fallback
    from arcdeploy.detector_package import FLOOR
    from arcdeploy.manifest import DetectorFidelity

    def check(mean: float, large_max: float, iou: float) -> DetectorFidelity:
        return DetectorFidelity(
            images=2,
            source="x",
            reference_faces=9,
            matched=9,
            lost=0,
            added=0,
            borderline=0,
            min_iou=iou,
            landmark_error_mean=mean,
            landmark_error_max=0.05,
            max_score_change=0.0,
            threshold=0.5,
            score_margin=0.05,
            floor=dict(FLOOR),
            passed=False,
            by_size={"large": {"landmark_error_max": large_max}, "small": {"landmark_error_max": 0.05}},
        )

    # the mean missed (small faces), the max on faces of a useful size met: only the mean is asked
    goal = detector_fallback.validation_goal(FLOOR, check(0.013, 0.007, 0.95))
    assert goal["landmark_error_mean"] == FLOOR["landmark_error_mean"] * detector_fallback.MARGIN
    assert goal["landmark_error_max"] == float("inf") and goal["iou"] == 0.0
    goal = detector_fallback.validation_goal(FLOOR, check(0.005, 0.04, 0.85))
    assert goal["landmark_error_mean"] == float("inf") and goal["iou"] == FLOOR["iou"]
    asked = FLOOR["landmark_error_max"] * detector_fallback.MARGIN
    assert goal["landmark_error_max"] == asked < FLOOR["landmark_error_max"]
