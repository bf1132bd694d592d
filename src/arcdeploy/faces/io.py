"""Image lists and decoding through OpenCV.

``list_images`` turns a folder or a list file into paths; ``read_image`` decodes
one file into RGB uint8 ``H x W x 3`` the way insightface's ``cv2.imread`` does
(grayscale expanded to 3 channels, alpha dropped, 16-bit scaled to 8-bit, EXIF
orientation applied), but with a reason when it cannot.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageError(ArcdeployError):
    """An image that cannot be used; the message names the file and the reason."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_image_name(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def list_images(spec: str | os.PathLike) -> list[Path]:
    """The images named by ``spec``, in a stable order.

    - a folder: every file below it (recursively) whose extension is one of
      jpg, jpeg, png, bmp, webp (any case), sorted by relative path;
    - a list file: one path per line, in file order; blank lines and lines
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
        text = spec.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ArcdeployError(f"{spec}: not a text list of image paths (not UTF-8 text)") from None
    except OSError as exc:
        raise ArcdeployError(f"{spec}: cannot read list file ({exc.strerror or exc})") from None
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


def decode_image(data: bytes, name: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Encoded image bytes -> RGB uint8 ``H x W x 3``; raises :class:`ImageError`."""
    import cv2

    if len(data) == 0:
        raise ImageError(name, "empty file")
    kind = _sniff(data)
    buf = np.frombuffer(data, np.uint8)
    try:
        # IMREAD_COLOR is what insightface's cv2.imread uses: 3 channels, 8 bits,
        # alpha dropped, EXIF orientation applied.
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as exc:
        raise ImageError(name, f"cannot decode ({str(exc).strip().splitlines()[-1]})") from None
    if img is None or img.size == 0:
        if kind is None:
            head = data[:64]
            textual = all(32 <= b < 127 or b in (9, 10, 13) for b in head)
            what = "a text file" if textual else "not JPEG, PNG, BMP or WebP data"
            raise ImageError(name, f"not an image ({what})")
        raise ImageError(name, f"corrupt {kind} (cannot be decoded)")
    if kind == "JPEG" and data.rfind(b"\xff\xd9") == -1:
        # libjpeg fills a cut-off file with grey and only warns; such a face is damaged
        raise ImageError(name, "truncated JPEG (no end-of-image marker)")
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    else:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read one image file -> RGB uint8 ``H x W x 3``; raises :class:`ImageError` with the reason.

    Bytes are read in Python and decoded with ``cv2.imdecode``, so any path the
    OS accepts works (non-ASCII names included).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageError(path, "no such file") from None
    except IsADirectoryError:
        raise ImageError(path, "is a folder, not an image") from None
    except PermissionError:
        raise ImageError(path, "unreadable (permission denied)") from None
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise ImageError(path, f"unreadable ({reason})") from None
    return decode_image(data, path)
