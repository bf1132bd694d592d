"""Aligned uint8 RGB crops -> the network's input (SPEC section 3)."""
from __future__ import annotations

import numpy as np

ALIGNED_SIZE = 112


def to_model_input(faces: np.ndarray, fmt: dict | None = None) -> np.ndarray:
    """uint8 NHWC RGB 112x112 crops -> the package's input format.

    ``fmt`` is a manifest's ``input`` entry. When preprocessing is folded into
    the graph (``dtype`` uint8, ``layout`` NHWC) the crops pass through as they
    are; otherwise they become float32 NCHW, (x - 127.5) / 127.5.
    """
    faces = np.asarray(faces)
    if faces.ndim == 3:
        faces = faces[None]
    if faces.shape[1:] != (ALIGNED_SIZE, ALIGNED_SIZE, 3):
        raise ValueError(f"expected [N, 112, 112, 3] aligned crops, got {list(faces.shape)}")
    fmt = fmt or {}
    if fmt.get("dtype") == "uint8":
        return np.ascontiguousarray(faces, dtype=np.uint8)
    x = faces.transpose(0, 3, 1, 2).astype(np.float32)
    x -= 127.5
    x /= 127.5
    return x
