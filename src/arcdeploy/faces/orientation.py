"""EXIF orientation: how the stored pixels of a photo turn upright, as ``cv2.imdecode`` turns them
(the pixels themselves, and the map of stored pixel coordinates onto upright ones)."""

from __future__ import annotations

import numpy as np

# EXIF orientations that swap width and height (the stored image is the upright one transposed)
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


# EXIF orientation -> the flip (cv2.flip's code) that follows the transpose of orientations 5-8: together
# they turn the stored pixels upright, as cv2.imdecode does
_EXIF_FLIP = {2: 1, 3: -1, 4: 0, 6: 1, 7: -1, 8: 0}


def upright(img: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels ``img`` turned upright by their EXIF ``orientation``."""
    import cv2

    if orientation in TRANSPOSED_ORIENTATIONS:
        img = cv2.transpose(img)
    flip = _EXIF_FLIP.get(orientation)
    return img if flip is None else cv2.flip(img, flip)


def orientation_map(orientation: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """EXIF ``orientation`` as an affine map of stored pixel coordinates (a ``w`` x ``h`` image)
    to upright ones: (2x2 matrix, translation)."""
    table = {
        1: (((1, 0), (0, 1)), (0, 0)),
        2: (((-1, 0), (0, 1)), (w - 1, 0)),
        3: (((-1, 0), (0, -1)), (w - 1, h - 1)),
        4: (((1, 0), (0, -1)), (0, h - 1)),
        5: (((0, 1), (1, 0)), (0, 0)),
        6: (((0, -1), (1, 0)), (h - 1, 0)),
        7: (((0, -1), (-1, 0)), (h - 1, w - 1)),
        8: (((0, 1), (-1, 0)), (0, w - 1)),
    }
    m, t = table[orientation]
    return np.array(m, np.float64), np.array(t, np.float64)
