"""Helpers the benchmark scripts share, imported as ``from _common import ...``: a script run as
``python benchmarks/NAME.py`` has this folder on its import path. arcdeploy itself is imported as
installed (``pip install -e .``; from a source tree without installing, ``PYTHONPATH=src``).

Timing uses the library's own loops (:func:`arcdeploy.engines.base.time_calls`,
:func:`arcdeploy.engines.base.interleaved_rates`), so a benchmark measures what ``arcdeploy bench``
and the build's speed check measure.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_REAL = (HERE.parent / ".." / "shared" / "real").resolve()
RESULTS = HERE / "results"
CALIB_PEOPLE = 50  # LFW identities whose images calibrate; the next ones are checked


def log(msg: str) -> None:
    """Progress on stderr, as it happens."""
    print(msg, file=sys.stderr, flush=True)


def lfw_split(real: Path) -> dict:
    """Calibration people (first 50 sorted identities, all their images in order) and held-out people."""
    lfw = real / "faces" / "lfw"
    people = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    if len(people) < 2 * CALIB_PEOPLE:
        raise SystemExit(f"{lfw}: {len(people)} identities, need {2 * CALIB_PEOPLE}")

    def images(names):
        return [p for n in names for p in sorted((lfw / n).glob("*.jpg"))]

    return {
        "landmarks": real / "faces" / "lfw_5pts.txt",
        "calib_people": people[:CALIB_PEOPLE],
        "check_people": people[CALIB_PEOPLE:],
        "calib": images(people[:CALIB_PEOPLE]),
        "check": images(people[CALIB_PEOPLE:]),
    }


def measure_speed(runtimes: dict, x_by_key: dict, rounds: int, seconds: float, min_runs: int = 3) -> dict:
    """{key: [img/s per round]}: every runtime (anything with ``infer(x)``) in turn per round, the order
    rotating, one warm-up run first; each round is logged."""
    from arcdeploy.engines.base import interleaved_rates

    calls = {k: (lambda rt=rt, x=x_by_key[k]: rt.infer(x)) for k, rt in runtimes.items()}
    items = {k: x_by_key[k].shape[0] for k in runtimes}

    def after_round(rnd: int, per: dict) -> None:
        log(f"    round {rnd + 1}/{rounds}: " + ", ".join(f"{k} {per[k][-1]:.1f}" for k in per))

    return interleaved_rates(calls, items, rounds, seconds, min_runs=min_runs, after_round=after_round)
