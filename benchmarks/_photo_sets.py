"""Photo sets made from the shared real material (for benchmarks and tests; written to a folder given
by the caller, never into the project).

- :func:`twelve_mp_set`: the shared photos resized (bicubic) to fit a 12-megapixel frame (4000x3000, or
  3000x4000 for portraits), saved as JPEG quality 90: what a phone photo library holds;
- :func:`group_photo`: a 3000x2171 JPEG (quality 90) of LFW colour images tiled in rows at 150-260 px,
  so its faces are 60-110 px wide, as in a group photo.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

FRAME = (4000, 3000)
GROUP_SIZE = (3000, 2171)


def _write_jpeg(path: Path, bgr: np.ndarray, quality: int = 90) -> None:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    path.write_bytes(buf.tobytes())


def twelve_mp_set(real: Path, out: Path) -> list[Path]:
    """Each photo of ``real/faces/photos`` fitted to a 12 MP frame, as ``out/<name>.jpg`` (made once)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for src in sorted((real / "faces" / "photos").rglob("*")):
        if src.suffix.lower() not in (".jpg", ".jpeg", ".png"):
            continue
        dst = out / f"{src.stem}.jpg"
        if not dst.exists():
            img = cv2.imread(str(src))
            h, w = img.shape[:2]
            fw, fh = FRAME if w >= h else FRAME[::-1]
            scale = min(fw / w, fh / h)
            size = (round(w * scale), round(h * scale))
            _write_jpeg(dst, cv2.resize(img, size, interpolation=cv2.INTER_CUBIC))
        paths.append(dst)
    return paths


def group_photo(real: Path, path: Path, size: tuple[int, int] = GROUP_SIZE, seed: int = 7, start: int = 0) -> Path:
    """A group photo of LFW colour faces (made once): rows of tiles 150-260 px on a grey ground;
    ``seed`` places the tiles, ``start`` picks which faces (another start, other people)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = sorted((real / "faces" / "lfw_colour").rglob("*.jpg"))
    width, height = size
    canvas = np.full((height, width, 3), 118, np.uint8)
    y, k = 12, 0
    while True:
        row = int(rng.integers(150, 261))
        if y + row > height - 8:
            break
        x = 10 + int(rng.integers(0, 20))
        while True:
            tile = int(rng.integers(150, 261))
            tile = min(tile, row)
            if x + tile > width - 8:
                break
            img = cv2.imread(str(sources[(start + k * 37) % len(sources)]))
            k += 1
            canvas[y : y + tile, x : x + tile] = cv2.resize(img, (tile, tile), interpolation=cv2.INTER_AREA)
            x += tile + int(rng.integers(4, 24))
        y += row + int(rng.integers(4, 16))
    _write_jpeg(path, canvas)
    return path
