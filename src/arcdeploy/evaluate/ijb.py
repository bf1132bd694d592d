"""IJB-B / IJB-C 1:1 verification (SPEC section 5), as insightface's ``eval_ijbc.py`` computes it.

Steps: read the three meta files; per image the raw feature (plus the raw
feature of its horizontal flip, F1); optionally L2-normalise it (N0); multiply
by the faceness score (D1); per template, average the images of each media and
sum the media (written here as one weighted sum, weight = score / media size);
L2-normalise the template; score a pair by the dot product of its two
templates; ROC and TAR@FAR as in :mod:`arcdeploy.evaluate.roc`.

Differences from insightface, all deliberate:
- aggregation is done in float64 (insightface sums the flip and averages media
  in float32, then normalises in float64); scores differ from insightface's by
  rounding only (~1e-7), and on the same scores the TAR table is identical;
- a pair naming a template that has no image is an error (insightface silently
  scores it against template row 0);
- failed images (NaN rows from the embed pipeline) are left out of their media;
  a template left with no image gets a zero feature (score 0) and is counted.
Pair scores are computed block-wise: pairs are grouped by their lower template
index and each block is one matrix product against the templates it needs (or
a gather where a block has few pairs), so 15.6M pairs cost seconds, not minutes.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArcdeployError
from .roc import FARS, auc, format_tar_table, roc, tar_at_far, thin_roc

TARGETS = ("IJBC", "IJBB")


# ---------------------------------------------------------------- meta files

@dataclass
class IJBMeta:
    """The meta files of one IJB set; arrays are in 5pts-file row order."""

    root: Path
    target: str
    names: list[str]
    templates: np.ndarray     # int64 [N]
    medias: np.ndarray        # int64 [N]
    landmarks: np.ndarray     # float32 [N, 5, 2], absolute pixels in the loose crop
    faceness: np.ndarray      # float32 [N]
    pair_t1: np.ndarray       # int64 [P]
    pair_t2: np.ndarray       # int64 [P]
    labels: np.ndarray        # int8 [P], 1 genuine, 0 impostor
    pair_lines: np.ndarray | None = None  # file line of each pair (None: line = row + 1)
    name_mismatches: int = 0  # rows whose image name differs between tid_mid and 5pts files
    files: dict = field(default_factory=dict)
    template_ids: np.ndarray | None = None  # sorted unique template ids [T]
    pair_i1: np.ndarray | None = None       # int32 row of pair_t1 in template_ids
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
            return [t.decode(errors="replace") for t in tokens[0::3]], tids, mids
    rows = _rows(data)
    if not rows:
        raise ArcdeployError(f"{path}: no rows")
    names, tids, mids = [], np.empty(len(rows), np.int64), np.empty(len(rows), np.int64)
    for i, (no, f) in enumerate(rows):
        if len(f) != 3:
            raise ArcdeployError(f"{path}: line {no}: expected 3 fields (image_name template_id media_id), got {len(f)}")
        names.append(f[0].decode(errors="replace"))
        tids[i] = _int(f[1], path, no, "template id")
        mids[i] = _int(f[2], path, no, "media id")
    return names, tids, mids


def read_5pts(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    data = _read_bytes(path, "name x1 y1 ... x5 y5 faceness_score")
    values = None
    tokens = _fast_tokens(data, 12)
    if tokens is not None:
        names = [t.decode(errors="replace") for t in tokens[0::12]]
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
                raise ArcdeployError(f"{path}: line {no}: expected 12 fields (name, 10 landmark coordinates, "
                                     f"faceness score), got {len(f)}")
            names.append(f[0].decode(errors="replace"))
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
        out[i] = [_int(f[0], path, no, "template id"), _int(f[1], path, no, "template id"), _int(f[2], path, no, "label")]
        if out[i, 2] not in (0, 1):
            raise ArcdeployError(f"{path}: line {no}: label {out[i, 2]} is not 0 or 1")
        line_no[i] = no
    return out[:, 0].copy(), out[:, 1].copy(), out[:, 2].astype(np.int8), line_no


def read_meta(root: str | os.PathLike, target: str = "IJBC") -> IJBMeta:
    """Read and cross-check the three meta files under ``root`` (…/IJB_release/IJBC)."""
    target = _check_target(target)
    root = Path(root)
    if not root.is_dir():
        raise ArcdeployError(f"{root}: IJB root is not a folder (expected IJB_release/{target} with meta/ and loose_crop/)")
    files = meta_paths(root, target)
    names_t, templates, medias = read_tid_mid(files["tid_mid"])
    names_p, landmarks, faceness = read_5pts(files["5pts"])
    if len(names_t) != len(names_p):
        raise ArcdeployError(f"{files['5pts']}: {len(names_p)} rows but {files['tid_mid'].name} has {len(names_t)}; "
                             "row i of both files must be the same image")
    mismatches = sum(a != b for a, b in zip(names_t, names_p))
    t1, t2, labels, pair_lines = read_pairs(files["pairs"])
    known = np.unique(templates)
    index = []
    for col in (t1, t2):
        pos = template_index(known, col)
        bad = pos < 0
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            line = int(pair_lines[i]) if pair_lines is not None else i + 1
            raise ArcdeployError(f"{files['pairs']}: line {line}: template {int(col[i])} has no image in {files['tid_mid'].name}")
        index.append(pos)
    return IJBMeta(root=root, target=target, names=names_p, templates=templates, medias=medias,
                   landmarks=landmarks, faceness=faceness, pair_t1=t1, pair_t2=t2, labels=labels,
                   pair_lines=pair_lines, name_mismatches=int(mismatches), files=files,
                   template_ids=known, pair_i1=index[0], pair_i2=index[1])


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


# ---------------------------------------------------------------- features -> templates -> scores

def mode_name(flip: bool, normalize_images: bool, detector_score: bool) -> str:
    return f"F{int(flip)} N{int(not normalize_images)} D{int(detector_score)}"


def check_features(feats: np.ndarray, images: int, source: str = "features") -> np.ndarray:
    feats = np.asarray(feats) if not isinstance(feats, np.ndarray) else feats
    if feats.ndim not in (2, 3) or (feats.ndim == 3 and feats.shape[1] != 2):
        raise ArcdeployError(f"{source}: features must be [N, D] or [N, 2, D], got {list(feats.shape)}")
    if feats.shape[0] != images:
        raise ArcdeployError(f"{source}: {feats.shape[0]} feature rows but the 5pts file has {images} images")
    if feats.shape[-1] < 1 or not np.issubdtype(feats.dtype, np.floating):
        raise ArcdeployError(f"{source}: features must be floating point with D >= 1, got {feats.dtype} {list(feats.shape)}")
    return feats


class _RowReader:
    """Row blocks of a features array. A memory-mapped .npy is read with plain
    file reads instead of through the map, so the 1 GB of IJB-C features does
    not stay resident (peak memory) once a block is done."""

    def __init__(self, feats: np.ndarray):
        self.feats = feats
        self.file = None
        if isinstance(feats, np.memmap) and getattr(feats, "filename", None) and feats.flags.c_contiguous:
            self.file = open(feats.filename, "rb")
            self.row_bytes = int(np.prod(feats.shape[1:])) * feats.dtype.itemsize
            self.offset = int(feats.offset)

    def __call__(self, s: int, e: int) -> np.ndarray:
        if self.file is None:
            return np.asarray(self.feats[s:e])
        self.file.seek(self.offset + s * self.row_bytes)
        out = np.fromfile(self.file, dtype=self.feats.dtype, count=(e - s) * self.row_bytes // self.feats.dtype.itemsize)
        return out.reshape((e - s,) + self.feats.shape[1:])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _image_block(block: np.ndarray, flip: bool) -> np.ndarray:
    """float64 per-image features of a block (flip: image + flipped image, raw, added in float64)."""
    if block.ndim == 2:
        return block.astype(np.float64)
    if flip:
        return np.add(block[:, 0], block[:, 1], dtype=np.float64)
    return block[:, 0].astype(np.float64)


@dataclass
class TemplateFeatures:
    ids: np.ndarray          # sorted unique template ids [T]
    features: np.ndarray     # float64 [T, D], L2-normalised (zero rows stay zero)
    failed_images: int
    empty_templates: int


def template_features(feats: np.ndarray, templates: np.ndarray, medias: np.ndarray, faceness: np.ndarray | None,
                      flip: bool = True, normalize_images: bool = False, chunk: int = 32768) -> TemplateFeatures:
    """Image features -> L2-normalised template features (media mean, sum over media)."""
    from scipy.sparse import csr_matrix

    n = templates.shape[0]
    if feats.ndim == 2:
        flip = False
    ids, tinv = np.unique(templates, return_inverse=True)
    tinv = tinv.astype(np.int64).ravel()
    # media index of every image: the media is (template, media id)
    order = np.lexsort((medias, tinv))
    t_s, m_s = tinv[order], medias[order]
    new = np.ones(n, bool)
    new[1:] = (t_s[1:] != t_s[:-1]) | (m_s[1:] != m_s[:-1])
    media_of = np.empty(n, np.int64)
    media_of[order] = np.cumsum(new) - 1
    del order, t_s, m_s, new
    face_w = np.ones(n) if faceness is None else np.asarray(faceness, dtype=np.float32).astype(np.float64)
    # One pass assuming every image is usable; images with a non-finite value (failed
    # images) are left out of their media, and if there are any, a second pass uses
    # the media sizes without them.
    valid = np.ones(n, bool)
    read = _RowReader(feats)
    try:
        for _attempt in (0, 1):
            sizes = np.bincount(media_of, weights=valid.astype(np.float64))
            weight = np.zeros(n, np.float64)
            weight[valid] = face_w[valid] / sizes[media_of[valid]]
            acc = np.zeros((ids.size, feats.shape[-1]), np.float64)
            found_invalid = False
            for s in range(0, n, chunk):
                rows = slice(s, min(n, s + chunk))
                x = _image_block(read(rows.start, rows.stop), flip)
                ok = np.isfinite(x).all(axis=1)
                if not ok.all():
                    x[~ok] = 0.0
                    if valid[rows][~ok].any():
                        found_invalid = True
                        valid[rows] &= ok
                w = weight[rows] * ok
                if normalize_images:
                    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
                    w /= np.where(norms > 0, norms, 1.0)
                m = csr_matrix((w, (tinv[rows], np.arange(x.shape[0]))), shape=(ids.size, x.shape[0]))
                acc += m @ x
            if not found_invalid:
                break
    finally:
        read.close()
    norms = np.sqrt(np.einsum("ij,ij->i", acc, acc))
    empty = norms == 0
    acc /= np.where(empty, 1.0, norms)[:, None]
    return TemplateFeatures(ids, acc, failed_images=int(n - valid.sum()), empty_templates=int(empty.sum()))


def pair_scores(tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray, block: int = 1024,
                gemm_ratio: float = 64.0) -> np.ndarray:
    """Dot products tfeats[i1[k]] . tfeats[i2[k]] for all k (float64).

    Pairs are grouped by their lower template index; a block of ``block``
    templates is scored with one matrix product against the templates its
    pairs need, unless it has so few pairs that gathering rows is cheaper
    (a gemm element costs ~1/gemm_ratio of a gathered pair).
    """
    t = tfeats.shape[0]
    idx_dtype = np.int32 if t < 2**31 else np.int64
    lo = np.minimum(i1, i2).astype(idx_dtype, copy=False)
    hi = np.maximum(i1, i2).astype(idx_dtype, copy=False)
    order = np.argsort(lo, kind="stable")
    lo, hi = lo[order], hi[order]
    out_sorted = np.empty(order.size, np.float64)
    starts = np.searchsorted(lo, np.arange(0, t + block, block, dtype=np.int64))
    col_pos = np.full(t, -1, np.int64)
    for b in range(starts.size - 1):
        s, e = int(starts[b]), int(starts[b + 1])
        if s == e:
            continue
        r0, r1 = b * block, min(t, (b + 1) * block)
        a, c = lo[s:e], hi[s:e]
        mask = np.zeros(t, bool)
        mask[c] = True
        cols = np.flatnonzero(mask)
        if (r1 - r0) * cols.size <= gemm_ratio * (e - s):
            g = tfeats[r0:r1] @ tfeats[cols].T
            col_pos[cols] = np.arange(cols.size)
            out_sorted[s:e] = g[a - r0, col_pos[c]]
        else:
            step = 16384
            for k in range(s, e, step):
                kk = slice(k, min(e, k + step))
                out_sorted[kk] = np.einsum("ij,ij->i", tfeats[lo[kk]], tfeats[hi[kk]])
    scores = np.empty(order.size, np.float64)
    scores[order] = out_sorted
    return scores


@dataclass
class IJBResult:
    name: str
    target: str
    mode: str
    tar: np.ndarray
    chosen_fpr: np.ndarray
    auc: float
    pairs: int
    genuine: int
    impostor: int
    templates: int
    images: int
    failed_images: int
    empty_templates: int
    scores: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    far: tuple = FARS
    scores_file: str | None = None
    features_file: str | None = None

    def to_json(self) -> dict:
        rf, rt = thin_roc(self.fpr, self.tpr)
        d = {
            "name": self.name, "target": self.target, "mode": self.mode,
            "far": list(self.far), "tar": [float(v) for v in self.tar],
            "tar_percent": ["%.2f" % (100 * float(v)) for v in self.tar],
            "fpr_at_chosen_point": [float(v) for v in self.chosen_fpr],
            "auc": self.auc, "pairs": self.pairs, "genuine": self.genuine, "impostor": self.impostor,
            "templates": self.templates, "images": self.images,
            "failed_images": self.failed_images, "empty_templates": self.empty_templates,
            "roc": {"fpr": rf, "tpr": rt},
        }
        if self.scores_file:
            d["scores_file"] = self.scores_file
        if self.features_file:
            d["features_file"] = self.features_file
        return d


def evaluate_features(meta: IJBMeta, feats: np.ndarray, name: str = "features", flip: bool = True,
                      detector_score: bool = True, normalize_images: bool = False,
                      source: str = "features") -> IJBResult:
    """The full protocol on image features in 5pts-file row order."""
    feats = check_features(feats, meta.images, source)
    flip = bool(flip and feats.ndim == 3)
    tf = template_features(feats, meta.templates, meta.medias, meta.faceness if detector_score else None,
                           flip=flip, normalize_images=normalize_images)
    if meta.pair_i1 is not None and np.array_equal(meta.template_ids, tf.ids):
        i1, i2 = meta.pair_i1, meta.pair_i2
    else:
        i1, i2 = template_index(tf.ids, meta.pair_t1), template_index(tf.ids, meta.pair_t2)
    scores = pair_scores(tf.features, i1, i2)
    del i1, i2
    try:
        fpr, tpr, _ = roc(meta.labels, scores)
    except ValueError as exc:
        raise ArcdeployError(f"{meta.files['pairs']}: {exc}") from None
    tars, chosen = tar_at_far(fpr, tpr, FARS)
    genuine = int(np.count_nonzero(meta.labels))
    return IJBResult(name=name, target=meta.target, mode=mode_name(flip, normalize_images, detector_score),
                     tar=tars, chosen_fpr=chosen, auc=auc(fpr, tpr), pairs=int(meta.labels.size),
                     genuine=genuine, impostor=int(meta.labels.size - genuine), templates=int(tf.ids.size),
                     images=meta.images, failed_images=tf.failed_images, empty_templates=tf.empty_templates,
                     scores=scores, fpr=fpr, tpr=tpr)


def load_features(path: str | os.PathLike) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise ArcdeployError(f"{path}: no such features file")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ArcdeployError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0]})") from None


def extract_features(package, meta: IJBMeta, out_dir: Path, flip: bool = True, batch: int | None = None,
                     progress: bool = True, name: str | None = None) -> tuple[np.ndarray, Path, int]:
    """Raw features of every IJB image through the package, cached in out_dir.

    An interrupted extraction resumes (the embed pipeline's parts folder); a
    finished one is reused when its record (package fingerprint, image list and
    landmarks, flip) matches, so a second evaluation costs no inference.
    """
    import hashlib
    import json

    from ..faces.pipeline import embed_files, package_fingerprint
    from ..package import load
    from ..files import write_json_atomic

    pkg = load(package)
    name = name or Path(pkg.path).name
    cache = out_dir / f"features_{name}_{meta.target.lower()}_{'flip' if flip else 'noflip'}.npy"
    record_path = cache.with_suffix(".json")
    h = hashlib.sha256()
    h.update("\n".join(meta.names).encode())
    h.update(np.ascontiguousarray(meta.landmarks, np.float32).tobytes())
    record = {"package": package_fingerprint(pkg), "images": h.hexdigest(), "count": meta.images,
              "flip": bool(flip), "raw": True}
    if cache.exists() and record_path.exists():
        try:
            old = json.loads(record_path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and {k: old.get(k) for k in record} == record:
            feats = load_features(cache)
            return feats, cache, int(old.get("failed", 0))
    res = embed_files(pkg, meta.image_paths(), landmarks=meta.landmarks, flip=flip, raw=True, batch=batch,
                      output=cache, resume=True, progress=progress)
    n_failed = len(res.failures or [])
    write_json_atomic(record_path, {**record, "failed": n_failed})
    return np.asarray(res.features), cache, n_failed


def _unique_names(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        if n in seen:
            seen[n] += 1
            out.append(f"{n}-{seen[n]}")
        else:
            seen[n] = 1
            out.append(n)
    return out


def evaluate_ijb(root: str | os.PathLike, target: str = "IJBC", packages=(), features=(), flip: bool = True,
                 detector_score: bool = True, normalize_images: bool = False, batch: int | None = None,
                 out_dir: str | os.PathLike | None = None, json_path: str | os.PathLike | None = None,
                 plot: bool = True, progress: bool = True, log=None) -> dict:
    """Evaluate packages (features extracted and cached in out_dir) or feature files.

    Returns the JSON document: the first method's fields at top level (``target``,
    ``far``, ``tar``, ``mode``, ...) and ``results``, one entry per method, in order.
    Writes ``<name>_<target>_scores.npy`` per method, ``roc.png`` and ``result.json``
    into out_dir.
    """
    from ..files import save_npy_atomic, write_json_atomic

    log = log or (lambda *_: None)
    packages, features = list(packages or []), list(features or [])
    if not packages and not features:
        raise ArcdeployError("eval ijb: give one or more packages or --features FEATS.npy")
    meta = read_meta(root, target)
    out = Path(out_dir) if out_dir else Path(f"ijb_{meta.target.lower()}_results")
    out.mkdir(parents=True, exist_ok=True)
    if meta.name_mismatches:
        log(f"warning: {meta.name_mismatches} rows name different images in {meta.files['tid_mid'].name} "
            f"and {meta.files['5pts'].name} (row order is what counts)")
    names = _unique_names([Path(p).name for p in packages] + [Path(f).stem for f in features])
    results: list[IJBResult] = []
    sources = [("package", p) for p in packages] + [("features", f) for f in features]
    for name, (kind, src) in zip(names, sources):
        if kind == "package":
            log(f"[{name}] extracting features of {meta.images} images ({'with' if flip else 'without'} flip) ...")
            feats, cache, n_failed = extract_features(src, meta, out, flip=flip, batch=batch, progress=progress,
                                                       name=name)
            if n_failed:
                log(f"[{name}] {n_failed} images failed; they are left out of their media")
            source, feat_file = str(cache), str(cache)
        else:
            feats = load_features(src)
            source, feat_file = str(src), str(src)
        res = evaluate_features(meta, feats, name=name, flip=flip, detector_score=detector_score,
                                normalize_images=normalize_images, source=source)
        del feats
        sf = out / f"{name}_{meta.target.lower()}_scores.npy"
        save_npy_atomic(sf, res.scores)
        res.scores_file, res.features_file = str(sf), feat_file
        results.append(res)
        log(f"[{name}] {res.mode}: TAR@FAR=1e-4 {100 * res.tar[2]:.2f}%, 1e-5 {100 * res.tar[1]:.2f}%")
    doc = {k: v for k, v in results[0].to_json().items()}
    doc["results"] = [r.to_json() for r in results]
    doc["table"] = format_tar_table([(f"{r.name}-{r.target}", r.tar) for r in results])
    if plot:
        from .plots import plot_roc

        png = out / "roc.png"
        plot_roc([(f"{r.name} ({r.mode})", r.fpr, r.tpr, r.auc) for r in results], png,
                 title=f"ROC on {meta.target}")
        doc["plot"] = str(png)
    write_json_atomic(out / "result.json", doc)
    if json_path:
        write_json_atomic(json_path, doc)
    return doc


def evaluate_packages(packages, root, target: str = "IJBC", flip: bool = True, out_dir=None, **kw) -> dict:
    """:func:`evaluate_ijb` for packages only (used by ``arcdeploy run``)."""
    kw.setdefault("progress", False)
    return evaluate_ijb(root, target, packages=[str(p) for p in packages], flip=flip, out_dir=out_dir, **kw)
