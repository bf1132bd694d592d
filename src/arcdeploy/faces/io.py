"""Image lists and decoding through OpenCV.

``list_images`` turns a folder or a list file into paths; ``read_image`` decodes
one file into RGB uint8 ``H x W x 3`` the way insightface's ``cv2.imread`` does
(grayscale expanded to 3 channels, alpha dropped, 16-bit scaled to 8-bit, EXIF
orientation applied), but with a reason when it cannot.

EXIF orientation: a phone that holds the camera sideways stores the pixels as the sensor
saw them and says in the EXIF ``Orientation`` tag how to turn them. ``cv2.imread`` and
``cv2.imdecode`` (without ``IMREAD_IGNORE_ORIENTATION``) apply it, for JPEG, PNG and WebP
alike, so a photo stored sideways is seen upright and faces are found and aligned the right
way up. :func:`jpeg_orientation` reads the tag itself for the reduced JPEG decodes, whose
pixel grid it must map back to the full image's (the header's size is the stored one: for
orientations 5-8 the upright image is its transpose).

Only JPEG, PNG, BMP and WebP data are decoded, and only after the size in the
file's header has been read (:func:`image_size`): an image above the pixel limit
(default 50 megapixels; ``ARCDEPLOY_MAX_PIXELS`` or the ``max_pixels`` argument)
is refused before any memory is spent on it. A "decompression bomb" (a 32000 x
32000 PNG of one colour is under 1 MB on disk) would otherwise cost gigabytes per
decoding thread.
"""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError
from .types import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "ARCDEPLOY_MAX_PIXELS"


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(spec: str | os.PathLike) -> list[Path]:
    """The images named by ``spec``, in a stable order.

    - a folder: every file below it (recursively) whose extension is one of
      jpg, jpeg, png, bmp, webp (any case), sorted by relative path;
    - a list file: one path per line (names as the file system's bytes: UTF-8 or
      not), in file order; blank lines and lines
      starting with ``#`` are skipped; relative paths are resolved against the
      list file's folder; when a line has extra whitespace-separated fields
      (``path label ...``) the first one is the path, unless the whole line
      names an existing file (a path with spaces);
    - a single image file: itself.

    Listed files are not opened here: a missing or broken one is reported when
    it is read, so one bad line does not stop a large job.
    """
    spec = Path(spec)
    if not spec.exists():
        raise ArcdeployError(f"{spec}: no such image folder or list file")
    if spec.is_dir():
        paths = sorted(
            (p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=lambda p: p.relative_to(spec).as_posix(),
        )
        if not paths:
            raise ArcdeployError(f"{spec}: no images (jpg, jpeg, png, bmp, webp) in this folder")
        return paths
    if is_image_name(spec):
        return [spec]
    try:
        data = spec.read_bytes()
    except OSError as exc:
        raise ArcdeployError(f"{spec}: cannot read list file ({exc.strerror or exc})") from None
    if b"\0" in data[:4096]:
        raise ArcdeployError(f"{spec}: not a text list of image paths (binary data)")
    # names are file system bytes: a name that is not UTF-8 keeps its bytes (surrogate escapes)
    text = os.fsdecode(data)
    base = spec.parent
    paths = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry)
        if not path.is_absolute():
            path = base / path
        if len(entry.split()) > 1 and not path.exists():
            first = Path(entry.split()[0])
            path = first if first.is_absolute() else base / first
        paths.append(path)
    if not paths:
        raise ArcdeployError(f"{spec}: the list names no images")
    return paths


def images_root(spec: str | os.PathLike) -> Path:
    """The folder image names are taken relative to: the folder itself, or a list file's folder."""
    spec = Path(spec)
    return spec if spec.is_dir() else spec.parent


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The pixel limit in force: ``max_pixels`` when given, else ``ARCDEPLOY_MAX_PIXELS``, else 50 megapixels."""
    value: float
    if max_pixels is not None:
        value, source = max_pixels, "max_pixels"
    else:
        raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_PIXELS
        source = MAX_PIXELS_ENV
        try:
            value = float(raw)
        except ValueError:
            raise ArcdeployError(f"{MAX_PIXELS_ENV}={raw!r}: not a number of pixels") from None
    if not value >= 1:
        raise ArcdeployError(f"{source} must be a positive number of pixels, got {value}")
    return int(value)


def _sniff(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


# JPEG frame headers (SOF0-3, 5-7, 9-11, 13-15) carry the size; DHT (C4), JPG (C8) and DAC (CC) do not
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
# markers that stand alone (no length field): TEM, RST0-7, SOI
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8), 0xD8}


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None  # not at a marker: the segment chain is broken
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if length < 2:
            return None
        if marker in _JPEG_SOF:
            if pos + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return (w, h) if w and h else None
        pos += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 24 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return (w, h) if w and h else None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    if len(data) < 26:
        return None
    (header,) = struct.unpack("<I", data[14:18])
    if header == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    w, h = abs(w), abs(h)  # a negative height means rows stored top-down
    return (w, h) if w and h else None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", data[26:30])
        return w & 0x3FFF, h & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        (bits,) = struct.unpack("<I", data[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        w = int.from_bytes(data[24:27], "little") + 1
        h = int.from_bytes(data[27:30], "little") + 1
        return w, h
    return None


# EXIF orientations that swap width and height (the stored image is the upright one transposed)
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def jpeg_orientation(data: bytes) -> int:
    """The EXIF ``Orientation`` (1-8) of JPEG data, read from its first ``Exif`` APP1 segment as
    OpenCV reads it; 1 (as stored) when there is none or it cannot be read."""
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return 1
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # no EXIF before the image data
            return 1
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\0\0":
            try:
                return _tiff_orientation(data[pos + 10 : pos + 2 + length])
            except struct.error:
                return 1
        if length < 2:
            return 1
        pos += 2 + length
    return 1


def _tiff_orientation(tiff: bytes) -> int:
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        tag, kind, _ = struct.unpack(order + "HHI", entry[:8])
        if tag == 0x0112 and kind == 3:  # Orientation, SHORT
            (value,) = struct.unpack(order + "H", entry[8:10])
            return value if 1 <= value <= 8 else 1
    return 1


_SIZE_READERS = {"JPEG": _jpeg_size, "PNG": _png_size, "BMP": _bmp_size, "WebP": _webp_size}


def image_size(data: bytes) -> tuple[str, tuple[int, int] | None] | None:
    """(format, (width, height)) read from the header of encoded image bytes, without decoding;
    None when the data is not JPEG, PNG, BMP or WebP; the size is None when the header is broken."""
    kind = _sniff(data)
    if kind is None:
        return None
    try:
        return kind, _SIZE_READERS[kind](data)
    except struct.error:
        return kind, None


def decode_image(data: bytes, name: str | os.PathLike = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 ``H x W x 3``; raises :class:`ImageError`.

    The header is read first: data that is not JPEG, PNG, BMP or WebP, a header
    without a size, and images above the pixel limit are refused before decoding.
    """
    import cv2

    if len(data) == 0:
        raise ImageError(name, "empty file")
    found = image_size(data)
    if found is None:
        head = data[:64]
        textual = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
        what = "a text file" if textual else "not JPEG, PNG, BMP or WebP data"
        raise ImageError(name, f"not an image ({what})")
    kind, size = found
    if size is None:
        raise ImageError(name, f"corrupt {kind} (no image size in its header)")
    limit = max_pixels_limit(max_pixels)
    w, h = size
    if w * h > limit:
        raise ImageError(
            name,
            f"image too large: {w}x{h} is {w * h / 1e6:.1f} megapixels, above the limit of "
            f"{limit / 1e6:g} megapixels (set {MAX_PIXELS_ENV} to change it)",
        )
    buf = np.frombuffer(data, np.uint8)
    try:
        # IMREAD_COLOR is what insightface's cv2.imread uses: 3 channels, 8 bits,
        # alpha dropped, EXIF orientation applied.
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageError(name, f"cannot decode ({str(exc).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise ImageError(name, f"corrupt {kind} (cannot be decoded)")
    if kind == "JPEG" and data.rfind(b"\xff\xd9") == -1:
        # libjpeg fills a cut-off file with grey and only warns; such a face is damaged
        raise ImageError(name, "truncated JPEG (no end-of-image marker)")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_image(path: str | os.PathLike, max_pixels: int | None = None) -> np.ndarray:
    """Read one image file -> RGB uint8 ``H x W x 3``; raises :class:`ImageError` with the reason.

    Bytes are read in Python and decoded with ``cv2.imdecode``, so any path the
    OS accepts works (non-ASCII and non-UTF-8 names included). ``max_pixels``: see
    :func:`max_pixels_limit`.
    """
    return decode_image(read_image_bytes(path), Path(path), max_pixels)


def read_image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of one image file, undecoded; raises :class:`ImageError` with the same reasons
    :func:`read_image` gives (so bytes read on one machine and decoded on another fail alike)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image") from None
    except PermissionError:
        raise ImageError(path, "unreadable (permission denied)") from None
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise ImageError(path, f"unreadable ({reason})") from None


def display_name(name: str | os.PathLike) -> str:
    """A file name safe to print on any terminal: bytes that are not UTF-8 (kept in a
    ``str`` as surrogate escapes) are shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")
