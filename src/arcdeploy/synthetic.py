"""Generated faces: cartoon faces drawn with OpenCV whose look depends on an identity seed,
placed in a loose crop with known 5 landmarks, and their aligned 112x112 crops.

Nothing here is real; the library uses these faces where a user gives no images (a fidelity
check on generated faces says so in its result), and the demo and the tests build on them.
"""

from __future__ import annotations

import numpy as np

# the ArcFace 112x112 alignment template
TEMPLATE_112 = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32,
)


def _similarity(angle_deg: float, scale: float, tx: float, ty: float, center: tuple[float, float]) -> np.ndarray:
    import cv2

    m = cv2.getRotationMatrix2D(center, angle_deg, scale)
    m[:, 2] += np.array([tx, ty])
    return m


def _look(identity: int) -> dict:
    """The drawn features of one identity (the random draws in a fixed order)."""
    idr = np.random.default_rng(10_000 + identity)
    look = {
        "bg": idr.integers(20, 235, 3).astype(np.float64),
        "skin": idr.integers(90, 250, 3).astype(np.float64),
        "hair": idr.integers(0, 200, 3).astype(np.float64),
        "face_w": idr.uniform(70, 92),
        "face_h": idr.uniform(96, 118),
        "hair_h": idr.uniform(20, 60),
    }
    look["blobs"] = [
        (idr.uniform(-60, 60), idr.uniform(-70, 50), idr.uniform(3, 12), idr.integers(0, 255, 3))
        for _ in range(idr.integers(2, 6))
    ]
    look["eye_r"] = idr.uniform(7, 13)
    look["iris"] = idr.integers(0, 160, 3).astype(np.float64)
    look["brow"] = idr.uniform(-0.3, 0.3)
    look["lip"] = idr.integers(60, 220, 3).astype(np.float64)
    return look


def _blend(family: dict, own: dict, likeness: float) -> dict:
    """An identity that shares ``likeness`` of its family's look (0: its own face, 1: the family's)."""
    out = {k: likeness * family[k] + (1 - likeness) * own[k] for k in own if k != "blobs"}
    keep = round(len(family["blobs"]) * likeness)
    out["blobs"] = family["blobs"][:keep] + own["blobs"][round(len(own["blobs"]) * likeness) :]
    return out


def draw_face(
    identity: int,
    variation: int = 0,
    size: int = 250,
    jitter: bool = True,
    family: int | None = None,
    likeness: float = 0.0,
    hard: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """An RGB uint8 loose crop of a cartoon face and its 5 landmarks (x, y), float32 [5, 2].

    ``identity`` fixes the face's look; ``variation`` changes pose, light and noise.
    ``family`` / ``likeness``: the identity shares that much of the family identity's look
    (look-alike impostors). ``hard``: strong variations (pose, light, colour cast, blur,
    an occluder), so the same identity's images differ much more.
    """
    look = _look(identity)
    if family is not None and likeness > 0:
        look = _blend(_look(family), look, float(likeness))
    var = np.random.default_rng([identity, variation])
    # the draws from ``var`` happen in a fixed order: features, the hard variation, then the placement
    img, lm = _draw_features(look, var, jitter)
    if hard:
        _hard_variation(img, var, lm)
    return _place_in_crop(img, lm, var, size, jitter, hard)


def _draw_features(look: dict, var: np.random.Generator, jitter: bool) -> tuple[np.ndarray, np.ndarray]:
    """The face drawn at 2x of the template frame (224x224) and its 5 landmarks there."""
    import cv2

    canon = 112 * 2
    lm = TEMPLATE_112 * 2.0
    img = np.zeros((canon, canon, 3), np.uint8)
    img[:] = look["bg"].astype(np.uint8)
    skin, hair = look["skin"].astype(int), look["hair"].astype(int)
    cx = float(lm[2, 0])
    face_w, face_h = look["face_w"], look["face_h"]
    cv2.ellipse(
        img, (int(cx), int(lm[2, 1] - 6)), (int(face_w), int(face_h)), 0, 0, 360, skin.tolist(), -1, cv2.LINE_AA
    )
    # hair: an arc on top, shape set by identity
    cv2.ellipse(
        img,
        (int(cx), int(lm[2, 1] - face_h + 20)),
        (int(face_w + 6), int(look["hair_h"])),
        0,
        180,
        360,
        hair.tolist(),
        -1,
        cv2.LINE_AA,
    )
    # identity texture: a few blobs (marks, glasses-like rims)
    for dx, dy, radius, color in look["blobs"]:
        c = (int(cx + dx), int(lm[2, 1] + dy))
        cv2.circle(img, c, int(radius), np.asarray(color).astype(int).tolist(), -1, cv2.LINE_AA)
    eye_r, brow = look["eye_r"], look["brow"]
    iris = look["iris"].astype(int).tolist()
    for k in (0, 1):
        ex, ey = lm[k]
        cv2.ellipse(
            img, (int(ex), int(ey)), (int(eye_r * 1.6), int(eye_r)), 0, 0, 360, (245, 245, 245), -1, cv2.LINE_AA
        )
        open_ = var.uniform(0.6, 1.0) if jitter else 0.8
        cv2.circle(img, (int(ex), int(ey)), int(eye_r * open_), iris, -1, cv2.LINE_AA)
        sign = -1 if k == 0 else 1
        p1 = (int(ex - 16), int(ey - 22 - sign * brow * 10))
        p2 = (int(ex + 16), int(ey - 22 + sign * brow * 10))
        cv2.line(img, p1, p2, hair.tolist(), 4, cv2.LINE_AA)
    nose = lm[2]
    pts = np.array([[nose[0], nose[1] - 34], [nose[0] - 10, nose[1] + 4], [nose[0] + 10, nose[1] + 4]], np.int32)
    cv2.fillPoly(img, [pts], (skin * 0.75).astype(int).tolist(), cv2.LINE_AA)
    lip = look["lip"].astype(int).tolist()
    smile = var.uniform(-6, 10) if jitter else 4
    mouth = np.array([lm[3], [(lm[3, 0] + lm[4, 0]) / 2, lm[3, 1] + smile], lm[4]], np.int32)
    cv2.polylines(img, [mouth], False, lip, 6, cv2.LINE_AA)
    return img, lm


def _place_in_crop(
    img: np.ndarray, lm: np.ndarray, var: np.random.Generator, size: int, jitter: bool, hard: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The drawn face placed into a ``size`` loose crop by a random similarity transform, with
    light and noise; (crop, its landmarks)."""
    import cv2

    canon = img.shape[0]
    turn = 28 if hard else 15
    angle = var.uniform(-turn, turn) if jitter else 0.0
    scale = (size / 250) * (var.uniform(0.62, 0.8) if jitter else 0.7)
    shift = var.uniform(-12, 12, 2) * (size / 250) if jitter else np.zeros(2)
    m = _similarity(angle, scale, 0, 0, (canon / 2, canon / 2))
    m[:, 2] += (size / 2 - canon / 2) + shift
    crop = cv2.warpAffine(img, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    landmarks = (np.c_[lm, np.ones(5)] @ m.T).astype(np.float32)
    if jitter:
        gain = var.uniform(0.45, 1.5) if hard else var.uniform(0.7, 1.25)
        noise = np.asarray(var.normal(0, 14 if hard else 6, crop.shape))
        if hard:  # a colour cast of the light
            noise += var.uniform(-35, 35, 3)
        crop = np.clip(crop.astype(np.float32) * gain + noise, 0, 255).astype(np.uint8)
        landmarks += var.normal(0, 0.8, landmarks.shape).astype(np.float32)
    return crop, landmarks


def _hard_variation(img: np.ndarray, var: np.random.Generator, lm: np.ndarray) -> None:
    """In place: an occluder (hand, scarf, sunglasses) over part of the face, then blur."""
    import cv2

    kind = var.integers(0, 3)
    color = var.integers(0, 255, 3).tolist()
    if kind == 0:  # sunglasses over both eyes
        y = int(lm[0, 1])
        cv2.rectangle(img, (int(lm[0, 0] - 28), y - 16), (int(lm[1, 0] + 28), y + 16), color, -1)
    elif kind == 1:  # scarf over the mouth
        y = int(lm[3, 1] - 12)
        cv2.rectangle(img, (0, y), (img.shape[1], img.shape[0]), color, -1)
    else:  # a hand from one side
        x = int(var.uniform(0.25, 0.75) * img.shape[1])
        cv2.ellipse(img, (x, int(lm[2, 1])), (40, 70), float(var.uniform(-40, 40)), 0, 360, color, -1)
    k = int(var.choice([1, 3, 5, 7]))
    if k > 1:
        img[:] = cv2.GaussianBlur(img, (k, k), 0)


def aligned_faces(n: int, seed: int = 0, identities: int | None = None) -> np.ndarray:
    """``n`` aligned 112x112 RGB uint8 synthetic faces (NHWC), deterministic in ``seed``."""
    import cv2

    identities = identities or max(1, n // 2)
    out = np.empty((n, 112, 112, 3), np.uint8)
    for i in range(n):
        img, lm = draw_face(seed * 7919 + i % identities, variation=i, size=160)
        m, _ = cv2.estimateAffinePartial2D(lm, TEMPLATE_112, method=cv2.LMEDS)
        out[i] = cv2.warpAffine(img, m, (112, 112), flags=cv2.INTER_LINEAR, borderValue=0)
    return out
