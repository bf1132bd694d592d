"""The service's one contact with the embed pipeline: how an uploaded file becomes aligned crops,
and how crops become the embeddings :meth:`arcdeploy.package.Package.embed` returns.

Everything the service takes from :mod:`arcdeploy.faces` and the embed pipeline is imported here
and nowhere else in :mod:`arcdeploy.serve`, so the service prepares images exactly as ``embed``
does (the same decoding, pixel limit, detector, alignment and failure wording) and follows that
layer wherever it goes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..faces.io import max_pixels_limit
from ..faces.pipeline import default_batch
from ..faces.prepare import (
    DETECTOR_THREADS,
    Detection,
    EncodedImage,
    Failure,
    Prepared,
    as_detection,
    prepare_image_or_failure,
)

__all__ = [
    "NON_FINITE",
    "Detection",
    "FaceFound",
    "Failure",
    "Prepared",
    "PreparedPart",
    "default_batch",
    "detector_settings",
    "embed_crops",
    "open_detection",
    "open_detector_file",
    "pixel_limit",
    "prepare_part",
]

# what embed says of a row the model gives as NaN or infinity
NON_FINITE = "the model gave a non-finite embedding"


@dataclass(frozen=True)
class FaceFound:
    """Where a detected face is: box x1 y1 x2 y2, its 5 points and the detector's score."""

    box: list[float]
    landmarks: list[list[float]]
    score: float


@dataclass(frozen=True)
class PreparedPart:
    """One uploaded image ready for the engine: its aligned crops uint8 [k, 112, 112, 3] and, when
    a detector found them, each crop's face (None for an aligned crop sent as it is)."""

    crops: np.ndarray
    faces: list[FaceFound | None]


def open_detection(detector, all_faces: bool = False) -> Detection | None:
    """A detector file, an opened detector or a :class:`Detection` as the :class:`Detection` that
    embed uses (best face, or every face with ``all_faces``); None stays None."""
    return as_detection(detector, all_faces)


def detector_settings(detector) -> tuple[dict, str] | None:
    """How to open ``detector`` again elsewhere (another process, another machine): the settings
    :func:`open_detector_file` takes and the detector file's path; None without a detector.
    Settings as ``embed --ray`` sends them."""
    detection = open_detection(detector) if detector is not None else None
    if detection is None:
        return None
    d = detection.detector
    settings = {
        "engine": getattr(d, "engine", "onnxruntime"),
        "threshold": d.threshold,
        "min_face": d.min_face,
        "threads": DETECTOR_THREADS,
        "pad_retry": d.pad_retry,
    }
    return settings, str(d.path)


def open_detector_file(path: str | os.PathLike, settings: dict):
    """The detector file opened with :func:`detector_settings`' settings."""
    from ..faces.detect import open_detector

    return open_detector(path, **settings)


def prepare_part(
    data: bytes, name: str, detection: Detection | None, max_pixels: int | None = None
) -> PreparedPart | str:
    """One uploaded file -> its crops, or a one-line reason naming ``name`` (never raises).

    Without ``detection`` the file is an aligned crop (at least 32x32, resized to 112x112, as
    ``embed`` takes images without landmarks); with it, its best face or every face."""
    res = prepare_image_or_failure(EncodedImage(name, data), None, 0, max_pixels, detection)
    if isinstance(res, Failure):
        return _one_line(str(res))
    if res.faces is None:
        return PreparedPart(res.crops, [None] * len(res.crops))
    found = [
        FaceFound(
            [float(v) for v in face.box],
            [[float(x), float(y)] for x, y in np.asarray(face.points).reshape(5, 2)],
            float(face.score),
        )
        for face in res.faces
    ]
    return PreparedPart(res.crops, list(found))


def pixel_limit(max_pixels: int | None = None) -> int:
    """The decoding limit in force (embed's: ``max_pixels``, else ``ARCDEPLOY_MAX_PIXELS``, else 50 MP)."""
    return max_pixels_limit(max_pixels)


def embed_crops(package, crops: np.ndarray) -> np.ndarray:
    """L2-normalised float32 embeddings [k, D] of aligned crops: the rows ``Package.embed`` gives
    (the same engine call and the same arithmetic as the embed pipeline's normalisation); a row the
    model gives as non-finite stays non-finite for the caller to refuse."""
    feats = np.asarray(package.infer(crops), dtype=np.float32)
    norm = np.linalg.norm(feats, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return (feats / np.maximum(norm, np.float32(1e-12))).astype(np.float32, copy=False)


def _one_line(text: str) -> str:
    # a client's file name may hold newlines or bytes that are not UTF-8
    return " ".join(os.fsencode(text).decode("utf-8", "backslashreplace").split())
