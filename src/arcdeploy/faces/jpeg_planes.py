"""A JPEG decoded to its Y, Cb and Cr planes, and pictures sampled from them.

A photo that is shrunk to a detector's canvas does not need all of its 12 million colour pixels:
the canvas samples a few of them, an aligned crop a few more. libjpeg-turbo's full decode spends a
fifth of its time after the inverse DCT, upsampling the half-size chroma planes and converting
every pixel to B, G, R (measured on the 12 MP photos, one core: 18.6 ms a photo in colour, 15.5 as
planes). So
a large photo is decoded to its planes (libturbojpeg's ``tjDecompressToYUVPlanes``: the same
entropy decoding and accurate inverse DCT as a full decode, nothing after it), and the canvas and
the crops are sampled from the planes where cv2.resize and cv2.warpAffine would sample the full
decode: luma and chroma each at its own position (libjpeg's smooth upsampling is the bilinear
interpolation of chroma samples centred between their luma pixels, so a chroma plane sampled
bilinearly at ``(x + 0.5) / 2 - 0.5`` is that upsampling), then converted to colour only there.
Conversion and interpolation are both linear, so the result differs from sampling the full decode
by rounding (and where a colour clips at 0 or 255): measured on the 12 MP photos' canvases, 0.05-0.18
of a grey level on average, at most 5. Not insightface's pixels to the bit, so SCRFD's landmarks move
a little (README: 0.07% of the eye distance on 12 MP portraits, more on faces a few canvas pixels
wide): the detectors' ``decode="planes"`` asks for it, the default decodes in full.

libturbojpeg is the system's (``libturbojpeg.so.0`` from libjpeg-turbo 2.0 or later; Debian and
Ubuntu ``libturbojpeg0``, Fedora ``turbojpeg``, Homebrew ``jpeg-turbo``), called through its
TurboJPEG 2 functions, which libjpeg-turbo 3 keeps: PyTurboJPEG, the usual binding, needs version
3, which the distributions do not ship yet. Without it, or for a JPEG it declines (CMYK, 12-bit,
a warning such as a cut-off file), :func:`decode_planes` returns None and the photo is decoded in
full as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass

import numpy as np

from .orientation import TRANSPOSED_ORIENTATIONS, orientation_map, upright

__all__ = ["YCbCrPlanes", "decode_planes", "planes_available"]

# turbojpeg.h (TurboJPEG 2 API)
_TJFLAG_ACCURATEDCT = 4096  # libjpeg's accurate integer IDCT, as OpenCV and simplejpeg decode
_TJFLAG_STOPONWARNING = 8192  # a warning (corrupt or cut-off data) fails the decode
_TJCS_YCBCR, _TJCS_GRAY = 1, 2
_TJSAMP_GRAY = 3
# chroma subsampling -> (horizontal, vertical) factor: 4:4:4, 4:2:2, 4:2:0, 4:4:0. The others (4:1:1,
# 4:4:1) libjpeg-turbo upsamples by repeating samples, not smoothly, so they are decoded in full
_SUBSAMPLING = {0: (1, 1), 1: (2, 1), 2: (2, 2), 4: (1, 2)}


@functools.cache
def _library() -> ctypes.CDLL | None:
    # what the loader finds, else the usual file name (each tried once)
    for candidate in dict.fromkeys(filter(None, [ctypes.util.find_library("turbojpeg"), "libturbojpeg.so.0"])):
        try:
            lib = ctypes.CDLL(candidate)
            lib.tjInitDecompress.restype = ctypes.c_void_p
            lib.tjDestroy.argtypes = [ctypes.c_void_p]
            lib.tjDecompressHeader3.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                *[ctypes.POINTER(ctypes.c_int)] * 4,
            ]
            lib.tjDecompressToYUVPlanes.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_ulong,
                ctypes.POINTER(ctypes.c_void_p),
                ctypes.c_int,
                ctypes.POINTER(ctypes.c_int),
                ctypes.c_int,
                ctypes.c_int,
            ]
            # libjpeg-turbo 2.0 and later (its error codes and TJFLAG_STOPONWARNING): an older one
            # would decode a cut-off file with grey filled in and only warn
            lib.tjGetErrorCode.argtypes = [ctypes.c_void_p]
            for plane_size in (lib.tjPlaneWidth, lib.tjPlaneHeight):
                plane_size.argtypes = [ctypes.c_int] * 3
        except (OSError, AttributeError):
            continue
        return lib
    return None


def planes_available() -> bool:
    """Whether libturbojpeg (2.0 or later) is on this machine."""
    return _library() is not None


@dataclass(frozen=True)
class YCbCrPlanes:
    """A JPEG's planes as stored: ``y`` (height x width) and, for a colour JPEG, ``cb`` and ``cr``
    subsampled by ``factors`` = (horizontal, vertical); ``orientation`` is the EXIF orientation
    that turns the stored image upright (as ``cv2.imdecode`` does)."""

    y: np.ndarray
    cb: np.ndarray | None
    cr: np.ndarray | None
    factors: tuple[int, int]
    orientation: int = 1

    @property
    def stored_size(self) -> tuple[int, int]:
        return int(self.y.shape[1]), int(self.y.shape[0])

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) of the upright image."""
        w, h = self.stored_size
        return (h, w) if self.orientation in TRANSPOSED_ORIENTATIONS else (w, h)

    def resized(self, width: int, height: int) -> np.ndarray | None:
        """The upright image resized to ``width`` x ``height`` (RGB) as ``cv2.resize`` (bilinear)
        resizes the full decode: each plane resized by cv2.resize itself, so luma is sampled at
        exactly that resize's positions and weights (a warp would put them on a 1/32-pixel grid,
        enough to move a small face's landmarks by tenths of a percent), and chroma at the same
        positions in its own grid (``(x + 0.5) / f - 0.5`` is where resizing the chroma plane by
        the same factor samples); then turned upright. None where the chroma planes' own scale
        rounds to another size (a shrink under 2x): such a picture is to be sampled instead."""
        import cv2

        turned = self.orientation in TRANSPOSED_ORIENTATIONS
        size = (height, width) if turned else (width, height)
        luma = cv2.resize(self.y, size, interpolation=cv2.INTER_LINEAR)
        if self.cb is None or self.cr is None:
            rgb = cv2.cvtColor(luma, cv2.COLOR_GRAY2RGB)
        else:
            # the chroma plane's own scale, not its size's: a plane of an odd-sized image is half a
            # sample wider than half the image, and resizing it to the size would stretch it so much
            w, h = self.stored_size
            fx, fy = size[0] * self.factors[0] / w, size[1] * self.factors[1] / h
            cr, cb = (cv2.resize(p, (0, 0), fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR) for p in (self.cr, self.cb))
            if cr.shape != luma.shape:
                return None
            rgb = cv2.cvtColor(cv2.merge([luma, cr, cb]), cv2.COLOR_YCrCb2RGB)
        return upright(rgb, self.orientation)

    def sample(self, to_upright: np.ndarray, size: tuple[int, int], black_border: bool) -> np.ndarray:
        """The RGB picture of ``size`` = (width, height) whose pixel (x, y) is the upright image,
        bilinearly interpolated, at ``to_upright @ (x, y, 1)`` (a 2x3 map): what ``cv2.warpAffine``
        with ``WARP_INVERSE_MAP`` gives from the full decode, up to rounding. Outside the image:
        black (``black_border``, as an aligned crop) or the nearest edge pixel (as ``cv2.resize``)."""
        import cv2

        w, h = self.stored_size
        turn, shift = orientation_map(self.orientation, w, h)  # stored -> upright; turn is orthogonal
        m = np.asarray(to_upright, np.float64)
        to_stored = np.hstack([turn.T @ m[:, :2], (turn.T @ (m[:, 2] - shift))[:, None]])
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        border = cv2.BORDER_CONSTANT if black_border else cv2.BORDER_REPLICATE
        luma = cv2.warpAffine(self.y, to_stored, size, flags=flags, borderMode=border, borderValue=0)
        if self.cb is None or self.cr is None:
            return cv2.cvtColor(luma, cv2.COLOR_GRAY2RGB)
        # chroma sample i sits at the centre of the luma pixels it covers: c = (x + 0.5) / f - 0.5
        f = np.array([[1.0 / self.factors[0]], [1.0 / self.factors[1]]])
        to_chroma = np.hstack([f * to_stored[:, :2], f * (to_stored[:, 2:] + 0.5) - 0.5])
        cr, cb = (
            cv2.warpAffine(p, to_chroma, size, flags=flags, borderMode=border, borderValue=128)
            for p in (self.cr, self.cb)
        )
        return cv2.cvtColor(cv2.merge([luma, cr, cb]), cv2.COLOR_YCrCb2RGB)


def decode_planes(data: bytes, orientation: int = 1) -> YCbCrPlanes | None:
    """``data`` (a JPEG) decoded to its planes, or None where libturbojpeg is absent or declines
    (not YCbCr or grayscale, an unusual subsampling, any warning)."""
    lib = _library()
    if lib is None:
        return None
    # a handle per call: handles are not to be shared between threads, and one kept per thread would
    # outlive the preparation threads of every embed call (a few microseconds to make)
    handle = lib.tjInitDecompress()
    if not handle:
        return None
    try:
        return _decode(lib, handle, data, orientation)
    finally:
        lib.tjDestroy(handle)


def _decode(lib: ctypes.CDLL, handle: int, data: bytes, orientation: int) -> YCbCrPlanes | None:
    w, h, sub, cs = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if lib.tjDecompressHeader3(handle, data, len(data), *(ctypes.byref(v) for v in (w, h, sub, cs))) != 0:
        return None
    gray = sub.value == _TJSAMP_GRAY
    factors = (1, 1) if gray else _SUBSAMPLING.get(sub.value)
    if cs.value not in (_TJCS_YCBCR, _TJCS_GRAY) or factors is None:
        return None
    width, height = w.value, h.value
    # libturbojpeg's own plane sizes: the luma plane is padded to whole chroma samples (an odd
    # height of a 4:2:0 JPEG gets a row more), so it is cut back to the image afterwards
    components = range(1 if gray else 3)
    shapes = [(lib.tjPlaneHeight(c, height, sub.value), lib.tjPlaneWidth(c, width, sub.value)) for c in components]
    if any(ph <= 0 or pw <= 0 for ph, pw in shapes):
        return None
    planes = [np.empty(s, np.uint8) for s in shapes]
    pointers = (ctypes.c_void_p * 3)(*[p.ctypes.data for p in planes])
    flags = _TJFLAG_ACCURATEDCT | _TJFLAG_STOPONWARNING
    if lib.tjDecompressToYUVPlanes(handle, data, len(data), pointers, width, None, height, flags) != 0:
        return None
    luma = planes[0][:height, :width]
    if gray:
        return YCbCrPlanes(luma, None, None, (1, 1), orientation)
    return YCbCrPlanes(luma, planes[1], planes[2], factors, orientation)
