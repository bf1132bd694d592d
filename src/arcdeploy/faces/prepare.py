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
- without landmarks: an aligned crop of at least 32x32 pixels, resized to 112x112.

A failure is an :class:`ImageError` naming the input and the reason; the embed
pipeline turns it into a :class:`Failure` row instead of stopping the job.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ArcdeployError, first_line
from .align import landmarks_problem, to_aligned
from .io import ImageError, decode_image, read_image
from .landmarks import Landmarks, read_landmarks


class Missing:
    """A landmark file was given but has no row for this image."""

    def __init__(self, source: str | None = None):
        self.source = source

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


@dataclass
class Failure:
    """An input that could not be used: its position, its name and why."""

    index: int
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class EncodedImage:
    """An image file's bytes, read where the file is and decoded elsewhere: ``name`` is the
    path it was read from (what failures name), ``error`` why it could not be read (then no
    ``data``)."""

    name: str
    data: bytes | None
    error: str | None = None


def input_name(item, index: int) -> str:
    if isinstance(item, EncodedImage):
        return item.name
    return str(item) if not isinstance(item, np.ndarray) else f"<array {index}>"


def as_rgb(arr: np.ndarray, name: str) -> np.ndarray:
    """A uint8 image array as H x W x 3 RGB (grayscale expanded, alpha dropped)."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8:
        raise ImageError(name, f"expected a uint8 RGB array, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif arr.ndim == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(name, f"expected an H x W x 3 RGB array, got shape {list(arr.shape)}")
    return arr


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
                raise ArcdeployError(f"image {i} is an array: landmarks by name need file paths "
                                     "(pass one [5, 2] array per image instead)")
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


def prepare_face(item, lmk=None, index: int = 0, max_pixels: int | None = None) -> np.ndarray:
    """One input (path, :class:`EncodedImage` or RGB array) -> its aligned uint8 [112, 112, 3] crop; raises
    :class:`ImageError`.

    ``lmk``: float32 [5, 2] (align), None (the input is an aligned crop) or a
    :class:`Missing`. ``max_pixels``: the decoding limit for files (see
    :func:`arcdeploy.faces.io.max_pixels_limit`).
    """
    name = input_name(item, index)
    if isinstance(lmk, Missing):
        where = os.path.basename(lmk.source) if lmk.source else "the landmark file"
        raise ImageError(name, f"no landmarks for this image in {where}")
    if isinstance(item, EncodedImage):
        if item.data is None:
            raise ImageError(name, item.error or "unreadable")
        img = decode_image(item.data, name, max_pixels)
    else:
        img = as_rgb(item, name) if isinstance(item, np.ndarray) else read_image(item, max_pixels)
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


def prepare_or_failure(item, lmk, index: int, max_pixels: int | None = None) -> np.ndarray | Failure:
    """:func:`prepare_face`, with any failure returned as a :class:`Failure` (never raised)."""
    try:
        return prepare_face(item, lmk, index, max_pixels)
    except ImageError as exc:
        return Failure(index, exc.path, exc.reason)
    except Exception as exc:  # an OpenCV or OS surprise on one image must not stop the job
        return Failure(index, input_name(item, index), f"{type(exc).__name__}: {first_line(exc)}")
