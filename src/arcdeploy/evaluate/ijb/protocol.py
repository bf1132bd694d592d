"""IJB 1:1 protocol: image features -> template features -> pair scores -> TAR@FAR.

Default (``precision="float32"``): the arithmetic of insightface's
``eval_ijbc.py``, operation for operation, so scores and TARs equal its own on
the same features:

1. per image, in float32 (its features are float32 and numpy keeps that dtype):
   F1 adds the raw feature of the image and of its flip; N0 divides by
   ``sqrt(sum(x ** 2))``; D1 multiplies by the float32 faceness score;
2. per template, in float32: the images of a media are summed one after the
   other in file order and divided by their count (``np.mean`` over rows; a
   media of one image is that image), and the media features are summed one
   after the other in ascending media id order;
3. the template sums, as float64, are L2-normalised as sklearn's ``normalize``
   does (``einsum`` norms; a norm below 10 eps counts as zero);
4. a pair's score is the dot product of its two templates.

Step 4 runs as blocked matrix products (15.6M pairs in seconds, where
insightface's product-and-sum takes minutes). A matrix product adds the terms
in another order, which moves a score by at most ``D * eps``; only scores that
close to another score could change places, so those few are recomputed exactly
as insightface does (elementwise product, numpy's sum over the feature axis).
The ranking of all scores, hence the ROC and every TAR, is then insightface's.

``precision="float64"`` aggregates steps 1-2 in float64 instead: more accurate,
but a few near-tied scores then rank differently from insightface's at millions
of pairs, which can move a TAR in its last printed digit.

Deliberate differences from insightface, both about input it never sees:
a failed image (a row with NaN or infinity) is left out of its media, and a
template left with no usable image gets a zero feature (its pairs score 0) and
is counted and reported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ...errors import ArcdeployError
from ..roc import FARS, auc, roc, tar_at_far, thin_roc
from .meta import IJBMeta, template_index

log = logging.getLogger(__name__)

AGGREGATION_DTYPES = ("float32", "float64")


def mode_name(flip: bool, normalize_images: bool, detector_score: bool) -> str:
    return f"F{int(flip)} N{int(not normalize_images)} D{int(detector_score)}"


def _dtype(precision: str):
    if precision not in AGGREGATION_DTYPES:
        raise ArcdeployError(f"aggregation precision must be float32 (insightface's) or float64, not {precision!r}")
    return np.float32 if precision == "float32" else np.float64


def check_features(feats: np.ndarray, images: int, source: str = "features") -> np.ndarray:
    feats = np.asarray(feats) if not isinstance(feats, np.ndarray) else feats
    if feats.ndim not in (2, 3) or (feats.ndim == 3 and feats.shape[1] != 2):
        raise ArcdeployError(f"{source}: features must be [N, D] or [N, 2, D], got {list(feats.shape)}")
    if feats.shape[0] != images:
        raise ArcdeployError(f"{source}: {feats.shape[0]} feature rows but the 5pts file has {images} images")
    if feats.shape[-1] < 1 or not np.issubdtype(feats.dtype, np.floating):
        raise ArcdeployError(
            f"{source}: features must be floating point with D >= 1, got {feats.dtype} {list(feats.shape)}"
        )
    return feats


class _RowReader:
    """Row blocks of a features array. A memory-mapped .npy is read with plain
    file reads instead of through the map, so the 1 GB of IJB-C features does
    not stay resident (peak memory) once a block is done."""

    def __init__(self, feats: np.ndarray):
        self.feats = feats
        self.file = None
        if isinstance(feats, np.memmap) and getattr(feats, "filename", None) and feats.flags.c_contiguous:
            self.file = open(str(feats.filename), "rb")  # closed by close()
            self.row_bytes = int(np.prod(feats.shape[1:])) * feats.dtype.itemsize
            self.offset = int(feats.offset)

    def __call__(self, s: int, e: int) -> np.ndarray:
        if self.file is None:
            return np.asarray(self.feats[s:e])
        self.file.seek(self.offset + s * self.row_bytes)
        count = (e - s) * self.row_bytes // self.feats.dtype.itemsize
        out = np.fromfile(self.file, dtype=self.feats.dtype, count=count)
        return out.reshape((e - s,) + self.feats.shape[1:])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _image_block(block: np.ndarray, flip: bool, dtype) -> np.ndarray:
    """Per-image features of a block in ``dtype`` (flip: image + flipped image, raw, added in ``dtype``)."""
    if block.ndim == 2:
        return block.astype(dtype, copy=False)
    if flip:
        return block[:, 0].astype(dtype, copy=False) + block[:, 1].astype(dtype, copy=False)
    return block[:, 0].astype(dtype)


def add_rows_in_order(acc: np.ndarray, idx: np.ndarray, x: np.ndarray) -> None:
    """``acc[idx[k]] += x[k]`` for k = 0, 1, ... in that order (each row of ``acc`` receives its
    rows one after the other, in the dtype of ``acc``), as ``np.add.at`` does, but faster: the
    k-th row of every target is added in one vectorised pass."""
    if idx.size == 0:
        return
    order = np.argsort(idx, kind="stable")
    grouped = idx[order]
    first = np.ones(grouped.size, bool)
    first[1:] = grouped[1:] != grouped[:-1]
    starts = np.flatnonzero(first)
    rank = np.empty(idx.size, np.int64)
    rank[order] = np.arange(idx.size) - np.repeat(starts, np.diff(np.append(starts, idx.size)))
    by_rank = np.argsort(rank, kind="stable")
    bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
    for r in range(bounds.size - 1):
        sel = by_rank[bounds[r] : bounds[r + 1]]
        acc[idx[sel]] += x[sel]  # targets are distinct within one pass


@dataclass
class TemplateFeatures:
    ids: np.ndarray  # sorted unique template ids [T]
    features: np.ndarray  # float64 [T, D], L2-normalised (templates with no usable feature: zero rows)
    failed_images: int  # images with a non-finite feature, left out
    empty_templates: int  # templates with no usable feature


def template_features(
    feats: np.ndarray,
    templates: np.ndarray,
    medias: np.ndarray,
    faceness: np.ndarray | None,
    flip: bool = True,
    normalize_images: bool = False,
    chunk: int = 32768,
    precision: str = "float32",
) -> TemplateFeatures:
    """Image features -> L2-normalised template features (media mean, sum over media); module doc."""
    dtype = _dtype(precision)
    n = templates.shape[0]
    if feats.ndim == 2:
        flip = False
    ids, tinv = np.unique(templates, return_inverse=True)
    tinv = tinv.astype(np.int64).ravel()
    # a media is (template, media id); media numbers follow template order, then media id order,
    # so adding media features in number order adds each template's in ascending media id
    order = np.lexsort((medias, tinv))
    t_s, m_s = tinv[order], medias[order]
    new = np.ones(n, bool)
    new[1:] = (t_s[1:] != t_s[:-1]) | (m_s[1:] != m_s[:-1])
    media_of = np.empty(n, np.int64)
    media_of[order] = np.cumsum(new) - 1
    media_template = t_s[new]
    del order, t_s, m_s, new
    n_media = media_template.size
    face = None if faceness is None else np.asarray(faceness, dtype=np.float32).astype(dtype)

    sums = np.zeros((n_media, feats.shape[-1]), dtype)
    counts = np.zeros(n_media, np.int64)
    read = _RowReader(feats)
    try:
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            x = _image_block(read(s, e), flip, dtype)
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                if normalize_images:
                    x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
                if face is not None:
                    x = x * face[s:e, np.newaxis]
            ok = np.isfinite(x).all(axis=1)
            rows = media_of[s:e]
            if not ok.all():
                rows, x = rows[ok], x[ok]
            add_rows_in_order(sums, rows, x)  # each media's images one after the other, in file order
            counts += np.bincount(rows, minlength=n_media)
    finally:
        read.close()
    used = counts > 0
    # np.mean's division: the float32 sum by the integer count, stored back as float32
    np.divide(sums, counts[:, np.newaxis], out=sums, casting="unsafe", where=used[:, np.newaxis])
    tsum = np.zeros((ids.size, feats.shape[-1]), dtype)
    add_rows_in_order(tsum, media_template[used], sums[used])  # in ascending media id
    del sums
    tfeat = tsum.astype(np.float64)
    del tsum
    # sklearn.preprocessing.normalize: einsum norms, near-zero norms replaced by 1
    norms = np.sqrt(np.einsum("ij,ij->i", tfeat, tfeat))
    usable = np.isfinite(norms) & (norms >= 10 * np.finfo(np.float64).eps)
    tfeat[~usable] = 0.0
    tfeat /= np.where(usable, norms, 1.0)[:, np.newaxis]
    return TemplateFeatures(ids, tfeat, failed_images=int(n - counts.sum()), empty_templates=int((~usable).sum()))


def pair_scores(
    tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray, block: int = 1024, gemm_ratio: float = 64.0
) -> np.ndarray:
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


def exact_pair_scores(tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray, batch: int = 100_000) -> np.ndarray:
    """Scores as insightface computes them: ``np.sum(f1 * f2, -1)`` (elementwise product,
    numpy's pairwise sum over the contiguous feature axis)."""
    out = np.empty(i1.size, np.float64)
    for s in range(0, i1.size, batch):
        e = min(i1.size, s + batch)
        out[s:e] = np.sum(tfeats[i1[s:e]] * tfeats[i2[s:e]], -1)
    return out


def settle_near_ties(scores: np.ndarray, tfeats: np.ndarray, i1: np.ndarray, i2: np.ndarray) -> int:
    """Recompute in place, exactly as insightface does, every score within the
    summation-order error bound of another score (module doc); returns how many."""
    if scores.size < 2:
        return 0
    # any order of adding the D products of two unit vectors is within D * eps/2 of the true
    # dot product, so two orders differ by at most D * eps and two scores can only swap places
    # when they are within 2 * D * eps; 4 * D * eps leaves a margin
    tol = 4.0 * tfeats.shape[1] * np.finfo(np.float64).eps
    order = np.argsort(scores, kind="stable")
    close = np.diff(scores[order]) <= tol
    near = np.zeros(scores.size, bool)
    near[:-1] |= close
    near[1:] |= close
    del close
    idx = np.sort(order[near])
    del order, near
    if idx.size:
        scores[idx] = exact_pair_scores(tfeats, np.asarray(i1)[idx], np.asarray(i2)[idx])
    return int(idx.size)


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
    precision: str = "float32"

    def to_json(self) -> dict:
        rf, rt = thin_roc(self.fpr, self.tpr)
        d = {
            "name": self.name,
            "target": self.target,
            "mode": self.mode,
            "far": list(self.far),
            "tar": [float(v) for v in self.tar],
            "tar_percent": ["%.2f" % (100 * float(v)) for v in self.tar],
            "fpr_at_chosen_point": [float(v) for v in self.chosen_fpr],
            "auc": self.auc,
            "pairs": self.pairs,
            "genuine": self.genuine,
            "impostor": self.impostor,
            "templates": self.templates,
            "images": self.images,
            "failed_images": self.failed_images,
            "empty_templates": self.empty_templates,
            "aggregation": self.precision,
            "roc": {"fpr": rf, "tpr": rt},
        }
        if self.scores_file:
            d["scores_file"] = self.scores_file
        if self.features_file:
            d["features_file"] = self.features_file
        return d


def aggregate_templates(
    meta: IJBMeta,
    feats: np.ndarray,
    flip: bool = True,
    detector_score: bool = True,
    normalize_images: bool = False,
    source: str = "features",
    precision: str = "float32",
    empty_note: str = "their pairs score 0",
) -> tuple[TemplateFeatures, bool]:
    """Checked image features (5pts-file row order) -> the template features of every template of the
    tid_mid file, and whether flip was used (only with [N, 2, D] features). The one aggregation of
    both protocols: 1:N (insightface's ``run_model_test_1N``) reuses 1:1's ``image2template_feature``.

    Raises when no template has a usable feature (every image failed, or all features are zero);
    warns, with counts, when some templates have none (``empty_note`` says what that does)."""
    feats = check_features(feats, meta.images, source)
    flip = bool(flip and feats.ndim == 3)
    tf = template_features(
        feats,
        meta.templates,
        meta.medias,
        meta.faceness if detector_score else None,
        flip=flip,
        normalize_images=normalize_images,
        precision=precision,
    )
    n_t = int(tf.ids.size)
    failed = f"{tf.failed_images} of {meta.images} images have non-finite features"
    if tf.empty_templates == n_t:
        raise ArcdeployError(f"{source}: no template has a usable feature ({failed}; the others sum to zero)")
    if tf.empty_templates:
        log.warning(
            "%s: %d of %d templates have no usable feature (%s); %s",
            source,
            tf.empty_templates,
            n_t,
            failed,
            empty_note,
        )
    elif tf.failed_images:
        log.warning("%s: %s; they are left out of their media", source, failed)
    return tf, flip


def evaluate_features(
    meta: IJBMeta,
    feats: np.ndarray,
    name: str = "features",
    flip: bool = True,
    detector_score: bool = True,
    normalize_images: bool = False,
    source: str = "features",
    precision: str = "float32",
) -> IJBResult:
    """The full protocol on image features in 5pts-file row order.

    Raises when no template has a usable feature (every image failed, or all
    features are zero); warns, with counts, when some templates have none.
    """
    tf, flip = aggregate_templates(meta, feats, flip, detector_score, normalize_images, source, precision)
    n_t = int(tf.ids.size)
    i1, i2 = meta.pair_i1, meta.pair_i2
    if i1 is None or i2 is None or meta.template_ids is None or not np.array_equal(meta.template_ids, tf.ids):
        i1, i2 = template_index(tf.ids, meta.pair_t1), template_index(tf.ids, meta.pair_t2)
    scores = pair_scores(tf.features, i1, i2)
    if precision == "float32":
        settle_near_ties(scores, tf.features, i1, i2)
    del i1, i2
    try:
        fpr, tpr, _ = roc(meta.labels, scores)
    except ValueError as exc:
        raise ArcdeployError(f"{meta.files['pairs']}: {exc}") from None
    tars, chosen = tar_at_far(fpr, tpr, FARS)
    genuine = int(np.count_nonzero(meta.labels))
    return IJBResult(
        name=name,
        target=meta.target,
        mode=mode_name(flip, normalize_images, detector_score),
        tar=tars,
        chosen_fpr=chosen,
        auc=auc(fpr, tpr),
        pairs=int(meta.labels.size),
        genuine=genuine,
        impostor=int(meta.labels.size - genuine),
        templates=n_t,
        images=meta.images,
        failed_images=tf.failed_images,
        empty_templates=tf.empty_templates,
        scores=scores,
        fpr=fpr,
        tpr=tpr,
        precision=precision,
    )
