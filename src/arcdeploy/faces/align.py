"""5-point similarity alignment to the ArcFace 112x112 template.

The transform is the least-squares similarity of Umeyama (1991) from the five
points to the template, the estimate insightface takes from scikit-image's
``SimilarityTransform``; the warp is bilinear with a constant 0 border.
"""

from __future__ import annotations

import numpy as np

from ..errors import ArcdeployError
from ..manifest import ALIGNED_SIZE
from .types import DecodedImage

TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)
# Landmark plausibility. Real detectors put a few points just outside the image (a
# face cut by the border), so points may lie up to half the image size outside it;
# farther out, or a face whose eyes are closer than MIN_EYE_DISTANCE pixels or whose
# aligned crop would span more than MAX_FACE_TO_IMAGE times the image's larger side,
# is a detector error that would give a black or meaningless crop.
LANDMARK_MARGIN = 0.5
MIN_EYE_DISTANCE = 3.0
MAX_FACE_TO_IMAGE = 4.0
# An image taken as an aligned crop (no landmarks) must be at least this many pixels
# on each side: a thumbnail blown up to 112x112 carries no face.
MIN_ALIGNED_SIDE = 32


def umeyama(src, dst, estimate_scale: bool = True) -> np.ndarray:
    """Least-squares similarity ``dst ~ s R src + t`` of point sets [K, D]; a (D+1)x(D+1) matrix.

    Degenerate input (all points equal) gives a matrix of NaN. Arithmetic runs
    in the inputs' precision (float32 when both are float32) into a float64
    matrix, the way scikit-image's estimate does, so the two agree to rounding.
    """
    src = np.asarray(src)
    dst = np.asarray(dst)
    dtype = np.result_type(src.dtype, dst.dtype, np.float32)
    src = src.astype(dtype, copy=False)
    dst = dst.astype(dtype, copy=False)
    k, d = src.shape
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / k
    sign = np.ones(d, dtype=np.float64)
    if np.linalg.det(cov) < 0:
        sign[-1] = -1  # reflection would fit better: force a proper rotation
    out = np.eye(d + 1)  # float64
    u, sv, vt = np.linalg.svd(cov)
    rank = int(np.count_nonzero(sv > sv.max() * max(cov.shape) * np.finfo(np.float64).eps))
    if rank == 0:
        return np.full((d + 1, d + 1), np.nan)
    if rank == d - 1:
        if np.linalg.det(u) * np.linalg.det(vt) > 0:
            out[:d, :d] = u @ vt
        else:
            keep = sign[-1]
            sign[-1] = -1
            out[:d, :d] = u @ np.diag(sign) @ vt
            sign[-1] = keep
    else:
        out[:d, :d] = u @ np.diag(sign) @ vt
    scale = 1.0 / sc.var(0).sum() * (sv @ sign) if estimate_scale else 1.0
    out[:d, d] = mu_d - scale * (out[:d, :d] @ mu_s)
    out[:d, :d] *= scale
    return out


def estimate_transform(lmk5, template=TEMPLATE_112) -> np.ndarray:
    """2x3 float64 similarity matrix mapping the 5 landmarks [5, 2] onto ``template``."""
    lmk = np.asarray(lmk5)
    lmk = lmk.astype(lmk.dtype if lmk.dtype in (np.float32, np.float64) else np.float64).reshape(-1, 2)
    if lmk.shape != (5, 2):
        raise ArcdeployError(f"expected 5 landmarks (x, y), got {lmk.shape[0]}")
    return umeyama(lmk, template)[:2]


def crop_span(lmk5) -> float | None:
    """How many pixels of the source image the aligned 112x112 crop spans (about the face's width
    there): under 112 the crop was upscaled from a small face. None for degenerate landmarks."""
    m = estimate_transform(np.asarray(lmk5, dtype=np.float64).reshape(5, 2))
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2])))) if np.all(np.isfinite(m)) else 0.0
    return ALIGNED_SIZE / scale if scale > 0 else None


def landmarks_problem(lmk5, shape) -> str | None:
    """Why these landmarks cannot align an image of ``shape`` (H, W, ...), or None when usable.

    Refused: non-finite values; any point more than half the image size outside
    the image; eyes less than ``MIN_EYE_DISTANCE`` pixels apart or all points at one
    place; a similarity transform that does not exist or whose crop would cover more
    than ``MAX_FACE_TO_IMAGE`` times the image's larger side.
    """
    lmk = np.asarray(lmk5, dtype=np.float64).reshape(-1, 2)
    if lmk.shape != (5, 2):
        return f"expected 5 landmark points, got {lmk.shape[0]}"
    if not np.all(np.isfinite(lmk)):
        return "landmarks are not finite numbers"
    h, w = shape[:2]
    mx, my = LANDMARK_MARGIN * w, LANDMARK_MARGIN * h
    near = (lmk[:, 0] >= -mx) & (lmk[:, 0] <= w + mx) & (lmk[:, 1] >= -my) & (lmk[:, 1] <= h + my)
    if not near.all():
        return (
            f"landmarks off the image ({5 - int(near.sum())} of 5 points more than "
            f"{LANDMARK_MARGIN:.0%} of the image size outside its {w}x{h} area)"
        )
    if np.ptp(lmk, axis=0).max() < 1.5:
        return "degenerate landmarks (all points at one place)"
    eyes = float(np.hypot(*(lmk[1] - lmk[0])))
    if eyes < MIN_EYE_DISTANCE:
        return f"degenerate landmarks (eyes {eyes:.1f} px apart; at least {MIN_EYE_DISTANCE:g} px needed)"
    m = estimate_transform(lmk.astype(np.float32))
    if not np.all(np.isfinite(m)):
        return "degenerate landmarks (no similarity transform)"
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))  # aligned pixels per image pixel
    span = ALIGNED_SIZE / scale if scale > 0 else float("inf")  # image pixels the crop covers
    if span > MAX_FACE_TO_IMAGE * max(h, w):
        return (
            f"implausible landmarks (the aligned crop would cover {span:.0f} px of a {w}x{h} image; "
            f"at most {MAX_FACE_TO_IMAGE:g} times its larger side)"
        )
    return None


def crop_transform(lmk5, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The 2x3 similarity map of image pixels onto the aligned ``size`` x ``size`` crop for these 5
    landmarks; raises :class:`ArcdeployError` when there is none (degenerate points)."""
    m = estimate_transform(lmk5, TEMPLATE_112 * (size / ALIGNED_SIZE))
    if not np.all(np.isfinite(m)):
        raise ArcdeployError("degenerate landmarks (no similarity transform)")
    return m


def align_face(img: np.ndarray, lmk5, size: int = ALIGNED_SIZE) -> np.ndarray:
    """The aligned ``size`` x ``size`` crop (uint8, channels kept) of ``img`` given its 5 landmarks."""
    import cv2

    m = crop_transform(lmk5, size)
    return cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def aligned_from(img: DecodedImage, points) -> np.ndarray:
    """The aligned 112x112 RGB crop of a face in a decoded photo, given its 5 points in full-image
    pixels: warped from the decoded pixels as :func:`align_face` warps, or sampled where that warp
    samples the full image (a photo held as planes)."""
    if img.planes is None:
        return img.in_rgb(to_aligned(img.decoded, img.from_full(points)))
    import cv2

    m = crop_transform(np.asarray(points, np.float32))
    return img.sample(cv2.invertAffineTransform(m), (ALIGNED_SIZE, ALIGNED_SIZE), black_border=True)


def to_aligned(img: np.ndarray, lmk=None) -> np.ndarray:
    """A 112x112 aligned crop: warped with ``lmk`` when given; otherwise ``img`` is
    taken as an aligned crop and resized to 112x112 when it is not (area
    interpolation when shrinking, bilinear when growing). An aligned crop smaller
    than ``MIN_ALIGNED_SIDE`` pixels on a side is refused."""
    import cv2

    if lmk is not None:
        return align_face(img, lmk)
    h, w = img.shape[:2]
    if min(h, w) < MIN_ALIGNED_SIDE:
        raise ArcdeployError(
            f"image is {w}x{h}: too small to be taken as an aligned face crop (at least "
            f"{MIN_ALIGNED_SIDE}x{MIN_ALIGNED_SIDE} without landmarks; give landmarks to align it)"
        )
    if (h, w) == (ALIGNED_SIZE, ALIGNED_SIZE):
        return img
    interp = cv2.INTER_AREA if h > ALIGNED_SIZE or w > ALIGNED_SIZE else cv2.INTER_LINEAR
    return cv2.resize(img, (ALIGNED_SIZE, ALIGNED_SIZE), interpolation=interp)
