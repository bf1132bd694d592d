"""The service's one contact with the embed pipeline: how an uploaded file becomes aligned crops,
and how crops become the embeddings :meth:`arcdeploy.package.Package.embed` returns.

Everything the service takes from :mod:`arcdeploy.faces` and the embed pipeline is imported here
and nowhere else in :mod:`arcdeploy.serve`, so the service prepares images exactly as ``embed``
does (the same decoding, pixel limit, detector, alignment and failure wording) and follows that
layer wherever it goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import printable
from ..faces.detectors import DetectorSpec, as_detector
from ..faces.detectors.package import detector_files
from ..faces.io import max_pixels_limit
from ..faces.job import default_batch
from ..faces.pipeline import NON_FINITE, features_of
from ..faces.prepare import Detection, as_detection, prepare_image_or_failure
from ..faces.types import EncodedImage, Failure, Prepared

__all__ = [
    "NON_FINITE",
    "Detection",
    "FaceFound",
    "Failure",
    "Prepared",
    "PreparedPart",
    "default_batch",
    "detector_files",
    "detector_spec",
    "embed_crops",
    "open_detection",
    "pixel_limit",
    "prepare_part",
]


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


def detector_spec(detector) -> DetectorSpec | None:
    """How to open ``detector`` again elsewhere (another process, another machine): its file and
    settings, as ``embed --ray`` sends them; None without a detector."""
    found = as_detector(detector.detector if isinstance(detector, Detection) else detector)
    if found is None or isinstance(found, DetectorSpec):
        return found
    if found.spec is None:
        raise ValueError(f"{found.describe()}: opened without a spec; open it with open_detector to send it")
    return found.spec


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
    (the embed pipeline's own engine call and normalisation); a row the model gives as non-finite
    stays non-finite for the caller to refuse."""
    return features_of(package, crops, flip=False, raw=False)


def _one_line(text: str) -> str:
    # a client's file name may hold newlines or bytes that are not UTF-8
    return printable(text)
