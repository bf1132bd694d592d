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
