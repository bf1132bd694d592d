"""The one way from an input image to the aligned 112x112 crop a model sees.

Embedding, benchmarking, calibration and the fidelity check all prepare faces
through :func:`prepare_face`, so an int8 model is calibrated on exactly what it
will be run on, and every caller applies the same checks:

- files: decoded by :func:`arcdeploy.faces.io.read_image` (header read first;
  only JPEG, PNG, BMP, WebP; at most the pixel limit); an :class:`EncodedImage`
  (a file's bytes read elsewhere, e.g. on the machine that holds it) is decoded
  the same way, under the file's name;
- arrays: uint8 RGB (grayscale expanded, alpha dropped);
- landmarks: plausible for the image (:func:`arcdeploy.faces.align.landmarks_problem`);
- without landmarks: an aligned crop of at least 32x32 pixels, resized to 112x112;
- with a detector (:class:`Detection`) instead of landmarks: the faces it finds in the
  decoded image, each aligned with its own 5 points (the best, i.e. largest, face, or
  every face). Detection runs here, in whichever thread prepares the image, so in the
  embed pipeline it runs in the decode/align workers beside inference.

A failure is an :class:`ImageError` naming the input and the reason; the embed
pipeline turns it into a :class:`Failure` row instead of stopping the job.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ArcdeployError, first_line
from .align import landmarks_problem, to_aligned
from .detectors import FaceDetector, as_detector
from .io import decode_image, read_image
from .landmarks import Landmarks, read_landmarks
from .types import EncodedImage, Failure, ImageError, Missing, Prepared, as_rgb, input_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Detection:
    """Faces found by a detector instead of given landmarks: each image's best (largest) face,
    or with ``all_faces`` every face it finds (best first). The detector is shared by the
    threads that prepare images (its ``detect`` is thread-safe)."""

    detector: FaceDetector
    all_faces: bool = False

    def no_face(self) -> str:
        return self.detector.no_face()

    def describe(self) -> str:
        which = "every face" if self.all_faces else "the largest face"
        return f"{self.detector.describe()}, {which}, 5-point similarity alignment"

    def identity(self) -> str:
        """What the detected faces depend on: the detector file's content and its settings."""
        return f"{self.detector.identity()} all_faces={self.all_faces}"


def as_detection(detector, all_faces: bool = False, **settings) -> Detection | None:
    """``detector`` (None, a :class:`Detection`, an opened detector, a
    :class:`~arcdeploy.faces.detectors.DetectorSpec` or a detector file, opened with
    ``settings``) as a :class:`Detection`."""
    if isinstance(detector, Detection):
        return detector if detector.all_faces == bool(all_faces) else Detection(detector.detector, bool(all_faces))
    found = as_detector(detector, **settings)
    if found is None:
        if all_faces:
            raise ArcdeployError("all faces: give a face detector to find them")
        return None
    return Detection(found if isinstance(found, FaceDetector) else found.open(), bool(all_faces))


def exclusive_landmarks_detector(landmarks, detector, landmarks_flag="--landmarks", detector_flag="--detector") -> None:
    """Landmarks say where the face is, a detector finds it: one or the other."""
    if landmarks is not None and detector is not None:
        raise ArcdeployError(
            f"{landmarks_flag} and {detector_flag} exclude each other: give landmarks for faces "
            "whose points are known, or a detector to find them"
        )


def decode_input(item, name: str, max_pixels: int | None = None) -> np.ndarray:
    """An input as an RGB uint8 image: a file read and decoded, an :class:`EncodedImage`
    decoded, an array checked."""
    if isinstance(item, EncodedImage):
        if item.data is None:
            raise ImageError(name, item.error or "unreadable")
        return decode_image(item.data, name, max_pixels)
    if isinstance(item, np.ndarray):
        return as_rgb(item, name)
    return read_image(item, max_pixels)


def resolve_landmarks(items: Sequence, landmarks, root=None) -> list | None:
    """Per-image landmarks: None (images are aligned crops) or a list with, per
    image, float32 [5, 2], None (this one is an aligned crop) or a :class:`Missing`.

    ``landmarks``: None; a landmark file path or :class:`Landmarks` (looked up
    by name, see :meth:`Landmarks.find`; ``root`` is the folder names are
    relative to); or a sequence / array [N, 5, 2] with one entry per image
    (None entries allowed).
    """
    if landmarks is None:
        return None
    if isinstance(landmarks, (str, os.PathLike)):
        landmarks = read_landmarks(landmarks)
    if isinstance(landmarks, Landmarks):
        missing = Missing(landmarks.source)
        out: list = []
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                raise ArcdeployError(
                    f"image {i} is an array: landmarks by name need file paths "
                    "(pass one [5, 2] array per image instead)"
                )
            pts = landmarks.find(item, root)
            out.append(missing if pts is None else pts)
        return out
    if len(landmarks) != len(items):
        raise ArcdeployError(f"{len(landmarks)} landmark entries for {len(items)} images")
    out = []
    for i, pts in enumerate(landmarks):
        if pts is None:
            out.append(None)
            continue
        pts = np.asarray(pts, dtype=np.float32)
        if pts.size != 10:
            raise ArcdeployError(f"landmarks of image {i}: expected 5 points [5, 2], got shape {list(pts.shape)}")
        out.append(pts.reshape(5, 2))
    return out


def prepare_face(
    item, lmk=None, index: int = 0, max_pixels: int | None = None, detection: Detection | None = None
) -> np.ndarray:
    """One input (path, :class:`EncodedImage` or RGB array) -> its aligned uint8 [112, 112, 3] crop;
    raises :class:`ImageError`.

    ``lmk``: float32 [5, 2] (align), None (the input is an aligned crop) or a
    :class:`Missing`. ``max_pixels``: the decoding limit for files (see
    :func:`arcdeploy.faces.io.max_pixels_limit`). ``detection``: find the face with
    a detector instead (``lmk`` must then be None); its best face.
    """
    if detection is not None:
        return prepare_image(item, lmk, index, max_pixels, Detection(detection.detector)).crops[0]
    name = input_name(item, index)
    if isinstance(lmk, Missing):
        where = os.path.basename(lmk.source) if lmk.source else "the landmark file"
        raise ImageError(name, f"no landmarks for this image in {where}")
    img = decode_input(item, name, max_pixels)
    if lmk is not None:
        problem = landmarks_problem(lmk, img.shape)
        if problem:
            raise ImageError(name, problem)
    try:
        return to_aligned(img, lmk)
    except ImageError:
        raise
    except ArcdeployError as exc:
        raise ImageError(name, str(exc)) from None


def prepare_image(
    item, lmk=None, index: int = 0, max_pixels: int | None = None, detection: Detection | None = None
) -> Prepared:
    """One input -> its aligned crops: one (:func:`prepare_face`), or with ``detection`` one per
    detected face kept (the best face, or every face whose points can align a crop); raises
    :class:`ImageError` (no face found is one)."""
    if detection is None:
        return Prepared(prepare_face(item, lmk, index, max_pixels)[None])
    if lmk is not None:
        raise ArcdeployError("landmarks and a detector exclude each other")
    name = input_name(item, index)
    img = decode_input(item, name, max_pixels)
    try:
        found = detection.detector.detect(img)
    except ArcdeployError as exc:
        raise ImageError(name, f"face detection failed: {first_line(exc)}") from None
    if not found:
        raise ImageError(name, detection.no_face())
    crops, faces, numbers = [], [], []
    for k, face in enumerate(found if detection.all_faces else found[:1]):
        problem = landmarks_problem(face.points, img.shape)
        if problem:
            if not detection.all_faces:
                raise ImageError(name, f"the detected face cannot be aligned: {problem}")
            # a tiny or degenerate face in a crowd: left out, as --min-face would
            log.debug("%s: face %d left out: %s", name, k, problem)
            continue
        crops.append(to_aligned(img, face.points))
        faces.append(face)
        numbers.append(k)
    if not crops:
        raise ImageError(name, f"no face that can be aligned among the {len(found)} found")
    return Prepared(np.stack(crops), faces, numbers)


def prepare_image_or_failure(
    item, lmk, index: int, max_pixels: int | None = None, detection: Detection | None = None
) -> Prepared | Failure:
    """:func:`prepare_image`, with any failure returned as a :class:`Failure` (never raised)."""
    try:
        return prepare_image(item, lmk, index, max_pixels, detection)
    except ImageError as exc:
        return Failure(index, exc.path, exc.reason)
    except Exception as exc:  # an OpenCV or OS surprise on one image must not stop the job
        return Failure(index, input_name(item, index), f"{type(exc).__name__}: {first_line(exc)}")
