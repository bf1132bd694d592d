"""Where the real test material lives (trained networks, real faces, LFW pairs), and a skip marker
for tests that need it. It sits beside the project in ../shared/real (never inside it: several
files carry research-only licences); ARCDEPLOY_REAL_DATA points elsewhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REAL = Path(os.environ.get("ARCDEPLOY_REAL_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "real")
REAL = REAL.resolve()
MODELS = REAL / "models"
FACES = REAL / "faces"
BINS = REAL / "bins"


def needs_real(*relpaths: str):
    """Skip (with the reason) unless every named file under the real-material folder exists."""
    missing = [p for p in relpaths if not (REAL / p).exists()]
    return pytest.mark.skipif(
        bool(missing), reason=f"real test material not found: {', '.join(str(REAL / p) for p in missing)}"
    )


def every_nth_pair(bin_path: Path, out: Path, n: int = 2) -> Path:
    """A .bin of every ``n``-th pair of ``bin_path`` (insightface's pickle: encoded images, issame list):
    1/n of the images, same and different pairs in the same proportion (lfw_600's first half is nearly
    all same-person pairs, so a prefix would not do)."""
    import pickle

    from arcdeploy.evaluate.binsets import read_bin

    images, issame = read_bin(bin_path)
    keep = range(0, len(issame), n)
    with open(out, "wb") as f:
        pickle.dump(([images[j] for i in keep for j in (2 * i, 2 * i + 1)], [bool(issame[i]) for i in keep]), f)
    return out
