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
import logging
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError, printable
from .jpeg_planes import decode_planes
from .orientation import TRANSPOSED_ORIENTATIONS, orientation_map, upright
from .types import DecodedImage, ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "ARCDEPLOY_MAX_PIXELS"


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def text_lines(data: bytes) -> list[str]:
    """The lines of a text file of names, as the file system's names: split at ``\n`` only (a
    ``\r`` before it dropped; no other character ends a line, so a name may hold U+2028 or a
    form feed), nothing stripped, a UTF-8 byte order mark at the start ignored, bytes that are
    not UTF-8 kept as surrogate escapes (``os.fsdecode``)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":  # the newline that ends the last line starts no line
        lines.pop()
    return [os.fsdecode(line[:-1] if line.endswith(b"\r") else line) for line in lines]


def _listed_path(entry: str, base: Path) -> Path:
    """The file a list line names: the line as it is when that file exists; else its first field
    when it has several (``path label ...``), else the line without the spaces around it when
    that file exists (an indented list); else the line as it is (reported when it is read)."""

    def resolve(name: str) -> Path:
        return Path(name) if Path(name).is_absolute() else base / name

    path = resolve(entry)
    if path.exists():
        return path
    fields = [f for f in _FIELD_SEP.split(entry) if f]
    if len(fields) > 1:
        return resolve(fields[0])
    stripped = entry.strip(" \t")
    if stripped != entry and resolve(stripped).exists():
        return resolve(stripped)
    return path


def list_images(spec: str | os.PathLike) -> list[Path]:
    """The images named by ``spec``, in a stable order.

    - a folder: every file below it (recursively) whose extension is one of
      jpg, jpeg, png, bmp, webp (any case), sorted by relative path;
    - a list file: one path per line, in file order (see :func:`text_lines`:
      names as the file system's bytes, nothing stripped); blank lines and lines
      whose first character is ``#`` are skipped, with a warning that counts them
      (row ``i`` is then the ``i``-th image line, not line ``i``); relative paths
      are resolved against the list file's folder; when a line has extra
      space- or tab-separated fields (``path label ...``) the first one is the
      path, unless the whole line names an existing file (a path with spaces),
      and spaces around a name are only dropped when the name with them names
      no file and the name without them does (see :func:`_listed_path`);
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
    kind = _sniff(data) or _sniff_other(data)
    if kind is not None:
        raise ArcdeployError(f"{spec}: a {kind} image given where a list of image paths is expected{_hint(kind)}")
    if b"\0" in data[:4096]:
        raise ArcdeployError(f"{spec}: not a text list of image paths (binary data)")
    base = spec.parent
    paths = []
    skipped = {"blank": 0, "comment": 0}
    for entry in text_lines(data):
        if not entry.strip():
            skipped["blank"] += 1
            continue
        if entry.startswith("#"):
            skipped["comment"] += 1
            continue
        paths.append(_listed_path(entry, base))
    if not paths:
        raise ArcdeployError(f"{spec}: the list names no images")
    if any(skipped.values()):
        what = " and ".join(f"{n} {k} line{'s' if n != 1 else ''}" for k, n in skipped.items() if n)
        log.warning("%s: %s skipped; rows follow the %d image lines", display_name(spec), what, len(paths))
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


_FIELD_SEP = re.compile(r"[ \t]+")


def _sniff_other(data: bytes) -> str | None:
    """Image formats arcdeploy does not decode, named so a refusal says what the file is."""
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"heim", b"heis"):
        return "HEIC/HEIF"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "AVIF"
    if data[:4] in (b"II*\0", b"MM\0*"):
        return "TIFF"
    return None


def _hint(kind: str) -> str:
    if kind in ("JPEG", "PNG", "BMP", "WebP"):
        return " (name it with its extension, or give its folder)"
    return f"; {kind} is not read: convert it to JPEG or PNG"


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


def checked_size(
    data: bytes, name: str | os.PathLike = "<bytes>", max_pixels: int | None = None
) -> tuple[str, int, int]:
    """(format, width, height) from the header of image bytes about to be decoded; raises
    :class:`ImageError` for data that is not JPEG, PNG, BMP or WebP, a header without a size,
    or an image above the pixel limit (the size as stored: before any EXIF turn)."""
    if len(data) == 0:
        raise ImageError(name, "empty file")
    found = image_size(data)
    if found is None:
        other = _sniff_other(data)
        if other is not None:
            raise ImageError(name, f"a {other} image{_hint(other)}")
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
    return kind, w, h


def _turbo_jpeg(data: bytes, bgr: bool) -> np.ndarray | None:
    """A JPEG decoded by libjpeg-turbo through ``simplejpeg``, upright: the decoder OpenCV bundles,
    with OpenCV's settings (accurate integer IDCT, smooth chroma upsampling), so the same pixels as
    ``cv2.imdecode(IMREAD_COLOR)`` (tested on the shared real photos and every chroma subsampling),
    ~15% faster on 12 MP photos (it writes the channel order asked for; measured with
    ``benchmarks/bench_photos.py``). None where it declines (not installed, CMYK or YCCK or RGB-coded,
    12-bit samples, any warning such as a cut-off file): OpenCV then decodes and reports."""
    try:
        import simplejpeg
    except ImportError:  # optional at run time: OpenCV decodes alike
        return None
    try:
        # what cameras and phones write; CMYK, YCCK and RGB-coded JPEGs are left to OpenCV's own conversion
        if simplejpeg.decode_jpeg_header(data)[2] not in ("YCbCr", "Gray"):
            return None
        img = simplejpeg.decode_jpeg(data, colorspace="BGR" if bgr else "RGB", strict=True)
    except (ValueError, TypeError):
        return None
    return upright(img, jpeg_orientation(data))


def _imdecode(data: bytes, flag: int, name: str | os.PathLike, kind: str, bgr: bool = False) -> np.ndarray:
    """Decoded with ``flag``: RGB, or with ``bgr`` OpenCV's own B, G, R order (no conversion).
    A JPEG decoded in full and in colour goes through :func:`_turbo_jpeg` first."""
    import cv2

    if kind == "JPEG" and flag == cv2.IMREAD_COLOR:
        img = _turbo_jpeg(data, bgr)
        if img is not None:
            return img
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        raise ImageError(name, f"cannot decode ({str(exc).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        raise ImageError(name, f"corrupt {kind} (cannot be decoded)")
    if kind == "JPEG" and data.rfind(b"\xff\xd9") == -1:
        # libjpeg fills a cut-off file with grey and only warns; such a face is damaged
        raise ImageError(name, "truncated JPEG (no end-of-image marker)")
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR if bgr else cv2.COLOR_GRAY2RGB)
    return img if bgr else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_image(data: bytes, name: str | os.PathLike = "<bytes>", max_pixels: int | None = None) -> np.ndarray:
    """Encoded image bytes -> RGB uint8 ``H x W x 3``; raises :class:`ImageError`.

    The header is read first: data that is not JPEG, PNG, BMP or WebP, a header
    without a size, and images above the pixel limit are refused before decoding.
    """
    import cv2

    kind, _, _ = checked_size(data, name, max_pixels)
    # IMREAD_COLOR is what insightface's cv2.imread uses: 3 channels, 8 bits,
    # alpha dropped, EXIF orientation applied.
    return _imdecode(data, cv2.IMREAD_COLOR, name, kind)


# JPEG DCT scaling: libjpeg decodes 8x8 blocks straight to 4x4, 2x2 or 1x1 pixels, which skips
# most of the inverse DCT and the colour conversion of the pixels not wanted
JPEG_REDUCTIONS = (8, 4, 2)
_REDUCED_FLAGS = {2: "IMREAD_REDUCED_COLOR_2", 4: "IMREAD_REDUCED_COLOR_4", 8: "IMREAD_REDUCED_COLOR_8"}


def reduction_for(width: int, height: int, at_least: tuple[int, int]) -> int:
    """The largest JPEG reduction (8, 4, 2; else 1) whose image of an upright ``width`` x ``height``
    photo is still at least ``at_least`` = (width, height) pixels."""
    for r in JPEG_REDUCTIONS:
        if -(-width // r) >= at_least[0] and -(-height // r) >= at_least[1]:
            return r
    return 1


def reduced_offset(orientation: int, stored: tuple[int, int], reduction: int) -> tuple[float, float]:
    """Where the pixels of a JPEG decoded at 1/``reduction`` lie in the full decode, both upright:
    ``full = reduction * reduced + offset``. In the stored frame pixel ``i`` of the reduced image
    is the block of full pixels ``r*i .. r*i + r - 1``, centred at ``r*i + (r - 1) / 2``; turning
    both images upright moves that by the orientation's translation, which depends on each image's
    own size (the reduced one is ``ceil(size / r)``: a last, partial block when the size is not a
    multiple of ``r``)."""
    w, h = stored
    r = int(reduction)
    m, t_full = orientation_map(orientation, w, h)
    _, t_red = orientation_map(orientation, -(-w // r), -(-h // r))
    centre = np.full(2, (r - 1) / 2.0)
    off = t_full - r * t_red + m @ centre
    return float(off[0]), float(off[1])


def decode_reduced(
    data: bytes,
    name: str | os.PathLike = "<bytes>",
    max_pixels: int | None = None,
    at_least: Callable[[int, int], tuple[int, int] | None] | None = None,
    as_planes: Callable[[int, int], bool] | None = None,
) -> DecodedImage:
    """Image bytes decoded for finding faces: a JPEG is decoded at 1/8, 1/4 or 1/2 of its size with
    libjpeg's DCT scaling (``cv2.IMREAD_REDUCED_COLOR_*``), the largest reduction whose image is
    still at least ``at_least(width, height)`` = (width, height) pixels for the upright full size,
    upright (EXIF orientation applied, as the full decode does); other formats, smaller JPEGs and
    ``at_least`` None (or returning None) are decoded in full. The result says how its pixels map
    onto the full image and keeps the bytes for a full decode; its pixels are in the decoder's
    B, G, R order (see :class:`DecodedImage`). A JPEG not reduced for which ``as_planes(width, height)``
    says so is held as its Y, Cb, Cr planes where libturbojpeg can decode it
    (:mod:`arcdeploy.faces.jpeg_planes`)."""
    import cv2

    kind, sw, sh = checked_size(data, name, max_pixels)
    r = 1
    orientation = 1
    if kind == "JPEG" and (at_least is not None or as_planes is not None):
        orientation = jpeg_orientation(data)
        w, h = (sh, sw) if orientation in TRANSPOSED_ORIENTATIONS else (sw, sh)
        wanted = at_least(w, h) if at_least is not None else None
        if wanted is not None:
            r = reduction_for(w, h, (int(wanted[0]), int(wanted[1])))
        if r == 1 and as_planes is not None and as_planes(w, h):
            planes = decode_planes(data, orientation)
            if planes is not None:
                return DecodedImage.from_planes(planes, data, str(name))
    if r == 1:
        bgr = _imdecode(data, cv2.IMREAD_COLOR, name, kind, bgr=True)
        return DecodedImage.full(bgr, data, str(name), bgr=True)
    bgr = _imdecode(data, getattr(cv2, _REDUCED_FLAGS[r]), name, kind, bgr=True)
    expect = (-(-h // r), -(-w // r))
    if bgr.shape[:2] != expect:  # an OpenCV that turned it otherwise: decode in full rather than guess
        bgr = _imdecode(data, cv2.IMREAD_COLOR, name, kind, bgr=True)
        return DecodedImage.full(bgr, data, str(name), bgr=True)
    return DecodedImage(bgr, (w, h), r, reduced_offset(orientation, (sw, sh), r), data, str(name), bgr=True)


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
    """A file name safe to print on any terminal, in one line: bytes that are not UTF-8 (kept in a
    ``str`` as surrogate escapes) shown as ``\\xNN``, control characters escaped (see
    :func:`arcdeploy.errors.printable`)."""
    return printable(os.fsdecode(name))
