"""5-point landmark files.

Accepted rows (fields separated by spaces or tabs, one image per line, lines as
:func:`arcdeploy.faces.io.text_lines` reads them; blank lines and lines whose first
field starts with ``#`` skipped; a UTF-8 byte order mark ignored; each name at most once):

- ``name x1 y1 ... x5 y5``            (10 numbers)
- ``name x1 y1 ... x5 y5 score``      (11 numbers: IJB ``*_name_5pts_score.txt``)
- ``name x1 y1 ... x68 y68``          (136 numbers: 68-point iBUG layout)
- ``name x1 y1 ... x68 y68 score``    (137 numbers)

68-point rows are reduced to the 5 alignment points (see :func:`reduce_68_to_5`). Coordinates are
absolute pixels in the image the name refers to.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePath

import numpy as np

from ..errors import ArcdeployError
from .io import display_name, text_lines

_FIELD_SEP = re.compile(r"[ \t]+")


def reduce_68_to_5(pts68) -> np.ndarray:
    """68 iBUG points [68, 2] -> the 5 alignment points [5, 2] (0-based indices).

    left eye = mean(36, 39), right eye = mean(42, 45), nose = 30, mouth = 48, 54.
    """
    p = np.asarray(pts68, dtype=np.float64).reshape(68, 2)
    out = np.stack([(p[36] + p[39]) / 2, (p[42] + p[45]) / 2, p[30], p[48], p[54]])
    return out.astype(np.float32)


class Landmarks(Mapping):
    """Landmark rows of one file: ``names`` (file order), ``points`` float32 [N, 5, 2],
    ``scores`` float32 [N] or None; and a mapping name -> points [5, 2].

    A file read by :func:`read_landmarks` names each image once; rows made in code with a name
    twice are looked up by their first row (``points`` keeps every row in file order).
    """

    def __init__(
        self, names: list[str], points: np.ndarray, scores: np.ndarray | None = None, source: str | None = None
    ):
        self.names = list(names)
        self.points = np.asarray(points, dtype=np.float32).reshape(len(self.names), 5, 2)
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float32)
        self.source = source
        self._index: dict[str, int] = {}
        for i, n in enumerate(self.names):
            self._index.setdefault(n, i)
        self._by_base: dict[str, list[int]] | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.points[self._index[name]]

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def index(self, name: str) -> int:
        return self._index[name]

    def score(self, name: str) -> float | None:
        return None if self.scores is None else float(self.scores[self._index[name]])

    def find(self, path: str | os.PathLike, root: str | os.PathLike | None = None) -> np.ndarray | None:
        """The points for an image file, or None.

        Rule, first match wins: (1) the path relative to ``root`` (the images
        folder, or the list file's folder), with ``/`` separators; (2) the path
        as given; (3) its file name alone, when exactly one row has that file
        name (a name given in the landmark file with folders is matched by its
        last component too).
        """
        path = PurePath(path)
        keys = []
        if root is not None:
            try:
                keys.append(Path(path).relative_to(Path(root)).as_posix())
            except ValueError:
                pass
        keys += [path.as_posix(), str(path)]
        for key in keys:
            if key in self._index:
                return self.points[self._index[key]]
        if path.name in self._index:
            return self.points[self._index[path.name]]
        if self._by_base is None:
            self._by_base = {}
            for i, n in enumerate(self.names):
                self._by_base.setdefault(PurePath(n.replace("\\", "/")).name, []).append(i)
        rows = self._by_base.get(path.name, [])
        if len({self.names[i] for i in rows}) == 1:
            return self.points[rows[0]]
        return None


def read_landmarks(path: str | os.PathLike, unique: bool = True) -> Landmarks:
    """Read a landmark file (see the module doc); errors name the file and line. ``unique=False``
    reads a file with a row per face (``detect --all-faces``): a name may then come back."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArcdeployError(f"{path}: no such landmark file") from None
    except OSError as exc:
        raise ArcdeployError(f"{path}: cannot read landmark file ({exc.strerror or exc})") from None
    if b"\0" in data[:4096]:
        raise ArcdeployError(f"{path}: not a text landmark file (binary data)")
    names: list[str] = []
    points: list[np.ndarray] = []
    scores: list[float] = []
    has_score: bool | None = None
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text_lines(data), 1):
        fields = [f for f in _FIELD_SEP.split(line) if f]
        if not fields or fields[0].startswith("#"):
            continue
        name, values = fields[0], fields[1:]
        if unique and name in first_line:
            raise ArcdeployError(
                f"{display_name(path)}:{lineno}: {display_name(name)!r} has a row already at line "
                f"{first_line[name]}; each image needs exactly one row (a file of every face, as "
                "detect --all-faces writes, is for reading, not for embedding: use embed --detector --all-faces)"
            )
        first_line[name] = lineno
        try:
            nums = np.array([float(v) for v in values], dtype=np.float64)
        except ValueError:
            bad = next(v for v in values if not _is_float(v))
            raise ArcdeployError(f"{path}:{lineno}: not a number: {bad!r}") from None
        n = nums.size
        if n in (10, 11):
            pts = nums[:10].reshape(5, 2)
        elif n in (136, 137):
            pts = reduce_68_to_5(nums[:136])
        else:
            raise ArcdeployError(
                f"{path}:{lineno}: expected 'name' and 10 or 11 numbers (5 points [+ score]) "
                f"or 136/137 (68 points [+ score]), got {n}"
            )
        if not np.all(np.isfinite(nums)):
            raise ArcdeployError(f"{path}:{lineno}: non-finite coordinate")
        row_score = n in (11, 137)
        if has_score is None:
            has_score = row_score
        elif has_score != row_score:
            raise ArcdeployError(f"{path}:{lineno}: rows mix with and without a score column")
        names.append(name)
        points.append(np.asarray(pts, dtype=np.float32))
        if row_score:
            scores.append(float(nums[-1]))
    if not names:
        raise ArcdeployError(f"{path}: no landmark rows")
    return Landmarks(names, np.stack(points), np.array(scores, np.float32) if has_score else None, source=str(path))


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True
