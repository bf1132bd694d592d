"""The three IJB-B / IJB-C meta files, read and cross-checked.

Layout under a root (``IJB_release/IJBC`` or ``.../IJBB``), ``t`` = ``ijbc`` or ``ijbb``:

- ``meta/t_face_tid_mid.txt``: ``image_name template_id media_id``
- ``meta/t_template_pair_label.txt``: ``tid1 tid2 label`` (1 genuine, 0 impostor)
- ``meta/t_name_5pts_score.txt``: ``name x1 y1 ... x5 y5 faceness_score``
- ``loose_crop/<name>``

Row i of the tid_mid file and row i of the 5pts file are the same image (row
order is what counts). Every error names the file and the line. Image names are
file system bytes: a name that is not UTF-8 keeps its bytes (decoded with
surrogate escapes, as :func:`os.fsdecode` does), so its file is still found.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import ArcdeployError

TARGETS = ("IJBC", "IJBB")


# ---------------------------------------------------------------- meta files


@dataclass
class IJBMeta:
    """The meta files of one IJB set; arrays are in 5pts-file row order."""

    root: Path
    target: str
    names: list[str]
    templates: np.ndarray  # int64 [N]
    medias: np.ndarray  # int64 [N]
    landmarks: np.ndarray  # float32 [N, 5, 2], absolute pixels in the loose crop
    faceness: np.ndarray  # float32 [N]
    pair_t1: np.ndarray  # int64 [P]
    pair_t2: np.ndarray  # int64 [P]
    labels: np.ndarray  # int8 [P], 1 genuine, 0 impostor
    pair_lines: np.ndarray | None = None  # file line of each pair (None: line = row + 1)
    name_mismatches: int = 0  # rows whose image name differs between tid_mid and 5pts files
    files: dict = field(default_factory=dict)
    template_ids: np.ndarray | None = None  # sorted unique template ids [T]
    pair_i1: np.ndarray | None = None  # int32 row of pair_t1 in template_ids
    pair_i2: np.ndarray | None = None

    @property
    def images(self) -> int:
        return len(self.names)

    def image_paths(self) -> list[Path]:
        crops = self.root / "loose_crop"
        return [crops / n for n in self.names]


def meta_paths(root: str | os.PathLike, target: str) -> dict[str, Path]:
    t = target.lower()
    meta = Path(root) / "meta"
    return {
        "tid_mid": meta / f"{t}_face_tid_mid.txt",
        "pairs": meta / f"{t}_template_pair_label.txt",
        "5pts": meta / f"{t}_name_5pts_score.txt",
    }


def _check_target(target: str) -> str:
    t = str(target).upper()
    if t not in TARGETS:
        raise ArcdeployError(f"unknown IJB target {target!r}: use IJBC or IJBB")
    return t


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.exists():
        raise ArcdeployError(f"{path}: missing IJB meta file ({what}); expected ROOT/meta/{path.name}")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ArcdeployError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _rows(data: bytes) -> list[tuple[int, list[bytes]]]:
    """(line number, fields) of every non-blank line."""
    out = []
    for no, line in enumerate(data.split(b"\n"), 1):
        fields = line.split()
        if fields:
            out.append((no, fields))
    return out


def _int(tok: bytes, path: Path, no: int, what: str) -> int:
    try:
        return int(tok)
    except ValueError:
        raise ArcdeployError(f"{path}: line {no}: {what} {tok.decode(errors='replace')!r} is not an integer") from None


def _fast_tokens(data: bytes, fields: int) -> list[bytes] | None:
    """All tokens when every line has exactly ``fields`` fields (checked by count, no blank
    lines), else None (the caller then walks the lines to name the bad one)."""
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    tokens = data.split()
    if lines == 0 or len(tokens) != fields * lines:
        return None
    return tokens


def _ints(tokens: list[bytes]) -> np.ndarray | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            v = np.fromstring(b" ".join(tokens), dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            return None
    return v if v.size == len(tokens) else None


def read_tid_mid(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    data = _read_bytes(path, "image_name template_id media_id")
    tokens = _fast_tokens(data, 3)
    if tokens is not None:
        tids, mids = _ints(tokens[1::3]), _ints(tokens[2::3])
        if tids is not None and mids is not None:
            return [os.fsdecode(t) for t in tokens[0::3]], tids, mids
    rows = _rows(data)
    if not rows:
        raise ArcdeployError(f"{path}: no rows")
    names, tids, mids = [], np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    for i, (no, f) in enumerate(rows):
        if len(f) != 3:
            raise ArcdeployError(
                f"{path}: line {no}: expected 3 fields (image_name template_id media_id), got {len(f)}"
            )
        names.append(os.fsdecode(f[0]))
        tids[i] = _int(f[1], path, no, "template id")
        mids[i] = _int(f[2], path, no, "media id")
    return names, tids, mids


def read_5pts(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    data = _read_bytes(path, "name x1 y1 ... x5 y5 faceness_score")
    values = None
    tokens = _fast_tokens(data, 12)
    if tokens is not None:
        names = [os.fsdecode(t) for t in tokens[0::12]]
        del tokens[0::12]
        try:  # Python's float(), as insightface parses them, then float32 as it stores them
            values = np.array(list(map(float, tokens)), dtype=np.float64).astype(np.float32).reshape(-1, 11)
        except ValueError:
            values = None
        del tokens
    if values is None or not np.all(np.isfinite(values)):
        rows = _rows(data)
        if not rows:
            raise ArcdeployError(f"{path}: no rows")
        names, values = [], np.empty((len(rows), 11), np.float32)
        for i, (no, f) in enumerate(rows):
            if len(f) != 12:
                raise ArcdeployError(
                    f"{path}: line {no}: expected 12 fields (name, 10 landmark coordinates, "
                    f"faceness score), got {len(f)}"
                )
            names.append(os.fsdecode(f[0]))
            try:
                values[i] = [float(t) for t in f[1:]]
            except ValueError:
                raise ArcdeployError(f"{path}: line {no}: landmark or score field is not a number") from None
            if not np.all(np.isfinite(values[i])):
                raise ArcdeployError(f"{path}: line {no}: landmark or score is not finite")
    return names, values[:, :10].reshape(-1, 5, 2), values[:, 10].copy()


def read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(t1, t2, label, line numbers or None). A fast whole-file parse; on any
    irregularity a line-by-line pass finds and names the first bad line."""
    data = _read_bytes(path, "tid1 tid2 label")
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    vals = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            vals = np.fromstring(data, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            vals = None
    if vals is not None and vals.size == 3 * lines and lines > 0:
        del data
        vals = vals.reshape(-1, 3)
        t1, t2, lab = vals[:, 0].copy(), vals[:, 1].copy(), vals[:, 2]
        bad = (lab != 0) & (lab != 1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ArcdeployError(f"{path}: line {i + 1}: label {lab[i]} is not 0 or 1")
        return t1, t2, lab.astype(np.int8), None
    # slow path: blank lines, or something malformed to point at
    rows = _rows(data)
    if not rows:
        raise ArcdeployError(f"{path}: no pairs")
    out = np.empty((len(rows), 3), np.int64)
    line_no = np.empty(len(rows), np.int64)
    for i, (no, f) in enumerate(rows):
        if len(f) != 3:
            raise ArcdeployError(f"{path}: line {no}: expected 3 fields (tid1 tid2 label), got {len(f)}")
        out[i] = [
            _int(f[0], path, no, "template id"),
            _int(f[1], path, no, "template id"),
            _int(f[2], path, no, "label"),
        ]
        if out[i, 2] not in (0, 1):
            raise ArcdeployError(f"{path}: line {no}: label {out[i, 2]} is not 0 or 1")
        line_no[i] = no
    return out[:, 0].copy(), out[:, 1].copy(), out[:, 2].astype(np.int8), line_no


def read_meta(root: str | os.PathLike, target: str = "IJBC", pairs: bool = True) -> IJBMeta:
    """Read and cross-check the three meta files under ``root`` (…/IJB_release/IJBC).

    ``pairs=False``: leave out the 1:1 pair file (1:N identification needs only the images,
    their templates and media); the pair arrays are then empty."""
    target = _check_target(target)
    root = Path(root)
    if not root.is_dir():
        raise ArcdeployError(
            f"{root}: IJB root is not a folder (expected IJB_release/{target} with meta/ and loose_crop/)"
        )
    files = meta_paths(root, target)
    names_t, templates, medias = read_tid_mid(files["tid_mid"])
    names_p, landmarks, faceness = read_5pts(files["5pts"])
    if len(names_t) != len(names_p):
        raise ArcdeployError(
            f"{files['5pts']}: {len(names_p)} rows but {files['tid_mid'].name} has {len(names_t)}; "
            "row i of both files must be the same image"
        )
    mismatches = sum(a != b for a, b in zip(names_t, names_p))
    if pairs:
        t1, t2, labels, pair_lines = read_pairs(files["pairs"])
    else:
        t1, t2, labels, pair_lines = np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int8), None
    known = np.unique(templates)
    index = []
    for col in (t1, t2):
        pos = template_index(known, col)
        bad = pos < 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            line = int(pair_lines[i]) if pair_lines is not None else i + 1
            raise ArcdeployError(
                f"{files['pairs']}: line {line}: template {int(col[i])} has no image in {files['tid_mid'].name}"
            )
        index.append(pos)
    return IJBMeta(
        root=root,
        target=target,
        names=names_p,
        templates=templates,
        medias=medias,
        landmarks=landmarks,
        faceness=faceness,
        pair_t1=t1,
        pair_t2=t2,
        labels=labels,
        pair_lines=pair_lines,
        name_mismatches=int(mismatches),
        files=files,
        template_ids=known,
        pair_i1=index[0],
        pair_i2=index[1],
    )


def template_index(known: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each id in the sorted unique ``known`` ids (int32), -1 where unknown.
    A lookup table when the id range is modest (IJB ids are < 10^6), else a binary search."""
    lo, hi = int(known[0]), int(known[-1])
    if hi - lo < 50_000_000:
        lut = np.full(hi - lo + 1, -1, np.int32)
        lut[known - lo] = np.arange(known.size, dtype=np.int32)
        inside = (ids >= lo) & (ids <= hi)
        out = np.full(ids.shape, -1, np.int32)
        out[inside] = lut[ids[inside] - lo]
        return out
    pos = np.searchsorted(known, ids).clip(0, known.size - 1)
    return np.where(known[pos] == ids, pos, -1).astype(np.int32)
