"""The values that travel between the face stages: inputs, faces, crops and failures.

Every stage (decoding, detection, alignment, the embed pipeline, Ray workers, the server)
speaks in these types, so they live below all of them and import nothing of the stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ArcdeployError

if TYPE_CHECKING:
    from .jpeg_planes import YCbCrPlanes

__all__ = [
    "MISSING",
    "DecodedImage",
    "EncodedImage",
    "Face",
    "Failure",
    "ImageError",
    "Missing",
    "Prepared",
    "as_rgb",
    "input_name",
]


class ImageError(ArcdeployError):
    """An image that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


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


@dataclass(frozen=True)
class DecodedImage:
    """An image decoded to find faces in: uint8 ``pixels``, possibly decoded at 1/2, 1/4 or
    1/8 of the full size (a JPEG's DCT scaling, see :func:`arcdeploy.faces.io.decode_reduced`),
    and where those pixels lie in the full image: ``full = reduction * pixel + offset`` per axis
    (pixel centres at integer coordinates, the image upright); or, for a large JPEG, its Y, Cb, Cr
    ``planes`` at full size instead of pixels (:mod:`arcdeploy.faces.jpeg_planes`: sampled in
    colour only where a canvas or a crop needs them). ``data``: the encoded bytes, kept so the
    image can be decoded again at full size (None for an image given as an array).

    ``bgr``: the pixels are in the decoder's B, G, R order. A photo decoded to find faces in keeps
    it, and only what is made from it (a detector's canvas, an aligned crop) is put in RGB order
    (:meth:`in_rgb`): swapping the channels of a 12-megapixel photo is a pass over 36 MB that the
    canvas and crops, made channel by channel, do not need (measured ~5 ms of ~50 ms of CPU per
    photo). The result is the same to the bit."""

    pixels: np.ndarray | None
    full_size: tuple[int, int]  # (width, height) of the full, upright image
    reduction: int = 1
    offset: tuple[float, float] = (0.0, 0.0)
    data: bytes | None = None
    name: str = ""
    bgr: bool = False
    planes: YCbCrPlanes | None = None

    @classmethod
    def full(cls, pixels: np.ndarray, data: bytes | None = None, name: str = "", bgr: bool = False) -> DecodedImage:
        return cls(pixels, (int(pixels.shape[1]), int(pixels.shape[0])), 1, (0.0, 0.0), data, name, bgr)

    @classmethod
    def from_planes(cls, planes: YCbCrPlanes, data: bytes | None = None, name: str = "") -> DecodedImage:
        return cls(None, planes.upright_size, 1, (0.0, 0.0), data, name, False, planes)

    @property
    def decoded(self) -> np.ndarray:
        """The decoded pixels (not for an image held as planes)."""
        if self.pixels is None:
            raise ValueError(f"{self.name}: held as JPEG planes, not pixels")
        return self.pixels

    def in_rgb(self, made: np.ndarray) -> np.ndarray:
        """``made`` (an H x W x 3 array made from ``pixels`` channel by channel: a canvas, a crop)
        in RGB order."""
        if not self.bgr:
            return made
        import cv2

        return cv2.cvtColor(made, cv2.COLOR_BGR2RGB)

    def rgb(self) -> np.ndarray:
        """The full-size image in RGB order (a full-size copy when they are BGR or planes)."""
        if self.planes is not None:
            return self.planes.sample(np.eye(2, 3), self.full_size, black_border=False)
        return self.in_rgb(self.decoded)

    def resized(self, width: int, height: int) -> np.ndarray:
        """The full image resized to ``width`` x ``height`` (RGB) as ``cv2.resize`` resizes it
        (bilinear): a full decode (and each of the planes) by ``cv2.resize`` itself; a reduced decode
        (or planes whose chroma would not resize to the size) sampled where that resize samples the
        full image."""
        import cv2

        if self.planes is not None:
            made = self.planes.resized(width, height)
            if made is not None:
                return made
        elif self.reduction == 1:
            return self.in_rgb(cv2.resize(self.decoded, (width, height), interpolation=cv2.INTER_LINEAR))
        sx, sy = self.full_size[0] / width, self.full_size[1] / height  # full pixels per pixel, as cv2.resize steps
        # pixel x -> full (x + 0.5) * sx - 0.5, clamped to the edge as cv2.resize does
        return self.sample(np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]]), (width, height), False)

    def sample(self, to_full: np.ndarray, size: tuple[int, int], black_border: bool) -> np.ndarray:
        """The RGB picture of ``size`` = (width, height) whose pixel (x, y) is the full image,
        bilinearly interpolated, at ``to_full @ (x, y, 1)`` (a 2x3 map); outside the image black
        (``black_border``) or its nearest edge pixel."""
        if self.planes is not None:
            return self.planes.sample(to_full, size, black_border)
        import cv2

        # full -> pixels: (full - offset) / reduction
        m = np.asarray(to_full, np.float64).copy()
        m[:, 2] -= self.offset
        m /= float(self.reduction)
        border = cv2.BORDER_CONSTANT if black_border else cv2.BORDER_REPLICATE
        made = cv2.warpAffine(
            self.decoded, m, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=border, borderValue=0
        )
        return self.in_rgb(made)

    @property
    def full_shape(self) -> tuple[int, int]:
        """(height, width) of the full image, as ``ndarray.shape`` has them."""
        return self.full_size[1], self.full_size[0]

    def to_full(self, xy: np.ndarray) -> np.ndarray:
        """Points [..., 2] (or boxes [..., 4]) in ``pixels`` -> in the full image."""
        xy = np.asarray(xy, np.float32)
        if self.reduction == 1 and self.offset == (0.0, 0.0):
            return xy
        off = np.tile(np.asarray(self.offset, np.float32), xy.shape[-1] // 2)
        return xy * np.float32(self.reduction) + off

    def from_full(self, xy: np.ndarray) -> np.ndarray:
        """Points [..., 2] (or boxes [..., 4]) in the full image -> in ``pixels``."""
        xy = np.asarray(xy, np.float32)
        if self.reduction == 1 and self.offset == (0.0, 0.0):
            return xy
        off = np.tile(np.asarray(self.offset, np.float32), xy.shape[-1] // 2)
        return (xy - off) / np.float32(self.reduction)


class Missing:
    """A landmark file was given but has no row for this image."""

    def __init__(self, source: str | None = None):
        self.source = source

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixels of the image given to the detector."""

    box: np.ndarray  # float32 [4]: x1, y1, x2, y2
    points: np.ndarray  # float32 [5, 2]: left eye, right eye, nose, left mouth, right mouth (image left/right)
    score: float

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def size(self) -> float:
        """The box's shorter side (what a minimum face size compares against)."""
        return min(self.width, self.height)


@dataclass
class Prepared:
    """What one input gives: aligned crops uint8 [k, 112, 112, 3] and, with a detector, the
    detected face of each crop and its place in the detector's best-first list."""

    crops: np.ndarray
    faces: list[Face] | None = None
    face_numbers: list[int] | None = None


def input_name(item, index: int) -> str:
    """What a failure calls an input: its path, the name it was read under, or its position."""
    if isinstance(item, EncodedImage):
        return item.name
    return str(item) if not isinstance(item, np.ndarray) else f"<array {index}>"


def as_rgb(image, name: str = "image") -> np.ndarray:
    """A uint8 image array as a contiguous H x W x 3 RGB array (grayscale expanded, alpha
    dropped); anything else is an :class:`ImageError` naming ``name``."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ImageError(name, f"expected a uint8 RGB array, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(name, f"expected an H x W x 3 RGB array, got shape {list(arr.shape)}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])
