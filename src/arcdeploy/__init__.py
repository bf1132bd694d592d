"""arcdeploy: an arcface_torch checkpoint in, a fast verified inference package out.

The Python API mirrors the command line::

    import arcdeploy
    arcdeploy.export("backbone.pth", "exported/")
    pkg = arcdeploy.load("pkg/")            # a built package
    feats = pkg.embed(["a.jpg", "b.jpg"])    # L2-normalised [N, 512]
    arcdeploy.compare(feats[0], feats[1])    # cosine similarity
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import ArcdeployError


def export(*args, **kwargs):
    from .export import export as _export

    return _export(*args, **kwargs)


def load(*args, **kwargs):
    from .package import load as _load

    return _load(*args, **kwargs)


def build(*args, **kwargs):
    from .build import build as _build

    return _build(*args, **kwargs)


def compare(a, b) -> float:
    """Cosine similarity of two embeddings (any scale)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


__all__ = ["ArcdeployError", "export", "load", "build", "compare", "__version__"]
