"""IJB 1:N open-set identification, as insightface's ``ijb_evals.py`` computes it
(``run_model_test_1N`` and ``evaluation_1N``; not the older ``ijb_1n.py``, which merges the
galleries and counts every probe as mated).

1. Template features: the 1:1 aggregation, unchanged (:func:`.protocol.aggregate_templates`:
   flip sum, optional per-image L2, faceness weight, media mean, template sum, L2 norm, in
   insightface's float32 order), for the templates listed in the gallery and probe files.
2. Each gallery (G1, G2; IJB-B's S1, S2) is searched on its own with every probe template:
   the score is the dot product of the two L2-normalised templates (float64).
3. A probe is *mated* for a gallery when its subject is enrolled there, else *non-mated*.
4. FPIR grid: ``10 ** v`` for ``v`` in ``np.arange(-4, 0, 4 / 100)``, then 1 (101 points; the
   values are insightface's to the last bit, e.g. 0.01000000000000004, not 0.01).
5. Threshold at FPIR ``f``: the top score of each non-mated probe, sorted descending; the element
   at index ``max(int(n_non_mated * f) - 1, 0)``.
6. A mated probe is a hit at ``f`` when its mate scores strictly above every other gallery
   template (rank 1; a tie is a miss) and strictly above the threshold. TPIR = hits / mated
   probes; mean TPIR = (TPIR_G1 + TPIR_G2) / 2.
7. Rank-k (k = 1, 5, 10): (mated probes whose mate is within the top k of G1 + the same for G2)
   divided by all probes (insightface's ``(g1_top_k + g2_top_k) / query_num``).

Where insightface leaves something undefined, arcdeploy says what it does:

- ties in rank-k: insightface ranks with ``np.argsort(scores)[::-1]``, whose order among equal
  scores depends on numpy's sort implementation (and the CPU's SIMD sort); here a tie counts
  against the mate (rank = the number of gallery templates scoring at least the mate's score),
  which is also how step 6 treats a tie at rank 1. Real float64 scores tie only for duplicate or
  empty (zero) templates;
- a gallery with no non-mated probe has no score to set a threshold from (insightface fails):
  the threshold is left out (``None`` in JSON) and every rank-1 mate is a hit;
- a gallery with no mated probe has no TPIR (insightface divides by zero): ``None`` in JSON, and
  the mean is ``None`` too;
- a gallery of one template: the mate has no competitor, so it is at rank 1.

The scores of a block of probes come from one matrix product (insightface: one ``np.dot`` of
all probes); each score is the same dot product, computed by the same BLAS.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from ...errors import ArcdeployError
from ...tables import box_table
from .meta import IJBMeta, template_index
from .meta_1n import GALLERIES, IJB1NLists
from .protocol import aggregate_templates, mode_name

log = logging.getLogger(__name__)

FPIR_STEPS = 100
RANKS = (1, 5, 10)
SHOWN_FPIRS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # insightface's table: every 25th grid point


def fpir_grid(steps: int = FPIR_STEPS) -> np.ndarray:
    """insightface's FPIR grid: ``[10 ** v for v in np.arange(-4, 0, 4 / steps)] + [1]`` (float64)."""
    return np.array([10**v for v in np.arange(-4, 0, 4 / steps)] + [1], dtype=np.float64)


def shown_indices(steps: int = FPIR_STEPS) -> list[int]:
    """Grid indices of the table's FPIRs 1e-4, 1e-3, 1e-2, 1e-1, 1 (insightface's ``[:: steps // 4]``)."""
    return list(range(0, steps + 1, steps // 4))


def threshold_index(non_mated: int, fpir: float) -> int:
    """Index into the descending non-mated top scores: ``max(int(non_mated * fpir) - 1, 0)``."""
    return max(int(non_mated * float(fpir)) - 1, 0)


@dataclass
class GallerySearch:
    """One gallery searched with every probe (module doc, steps 2-7)."""

    templates: int
    mated: int
    non_mated: int
    tpir: np.ndarray  # float64 [F]; NaN: no mated probe
    threshold: np.ndarray  # float64 [F]; NaN: no non-mated probe (no threshold)
    mate_rank: np.ndarray  # int64 [mated]: 1 + the gallery templates other than the mate scoring >= the mate
    mate_score: np.ndarray  # float64 [mated]
    best_other: np.ndarray  # float64 [mated]: the best score of the other gallery templates (-inf: none)
    top_non_mated: np.ndarray  # float64 [non_mated], in probe order

    def within(self, k: int) -> int:
        """Mated probes whose mate is within the top ``k``."""
        return int(np.count_nonzero(self.mate_rank <= k))


def search_gallery(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    fpirs: np.ndarray | None = None,
    block: int = 4096,
) -> GallerySearch:
    """Search one gallery (one template per subject) with every probe; L2-normalised template
    features in, TPIR and threshold at each FPIR out (module doc)."""
    fpirs = fpir_grid() if fpirs is None else np.asarray(fpirs, np.float64)
    probe_subjects = np.asarray(probe_subjects)
    gallery_subjects = np.asarray(gallery_subjects)
    g = gallery_feats.shape[0]
    if g == 0:
        raise ArcdeployError("a 1:N gallery needs at least one template")
    by_subject = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[by_subject]
    if np.any(sorted_subjects[1:] == sorted_subjects[:-1]):
        raise ArcdeployError("a 1:N gallery holds one template per subject")
    pos = np.searchsorted(sorted_subjects, probe_subjects).clip(0, g - 1)
    mate_col = np.where(sorted_subjects[pos] == probe_subjects, by_subject[pos], -1)
    is_mated = mate_col >= 0
    n_mated = int(np.count_nonzero(is_mated))
    mate_score = np.empty(n_mated, np.float64)
    best_other = np.empty(n_mated, np.float64)
    mate_rank = np.empty(n_mated, np.int64)
    top_non_mated = np.empty(probe_subjects.size - n_mated, np.float64)
    gallery_t = np.ascontiguousarray(gallery_feats, dtype=np.float64).T
    m_at = n_at = 0
    for s in range(0, probe_subjects.size, block):
        e = min(probe_subjects.size, s + block)
        scores = np.asarray(probe_feats[s:e], dtype=np.float64) @ gallery_t
        cols = mate_col[s:e]
        mated = cols >= 0
        if mated.any():
            rows = scores[mated]
            c = cols[mated]
            r = np.arange(c.size)
            mate = rows[r, c]
            rank = np.count_nonzero(rows >= mate[:, np.newaxis], axis=1)  # the mate itself counts once
            rows[r, c] = -np.inf
            other = rows.max(axis=1) if g > 1 else np.full(c.size, -np.inf)
            k = c.size
            mate_score[m_at : m_at + k], best_other[m_at : m_at + k], mate_rank[m_at : m_at + k] = mate, other, rank
            m_at += k
        if not mated.all():
            top = scores[~mated].max(axis=1)
            top_non_mated[n_at : n_at + top.size] = top
            n_at += top.size
    n_non_mated = top_non_mated.size
    descending = np.sort(top_non_mated)[::-1]
    if n_non_mated:
        threshold = np.array([descending[threshold_index(n_non_mated, f)] for f in fpirs], np.float64)
    else:
        threshold = np.full(fpirs.size, np.nan)
    rank_one = mate_score > best_other
    passes = np.where(np.isnan(threshold), -np.inf, threshold)
    if n_mated:
        hits = np.array([np.count_nonzero(rank_one & (mate_score > t)) for t in passes], np.float64)
        tpir = hits / n_mated
    else:
        tpir = np.full(fpirs.size, np.nan)
    return GallerySearch(
        templates=g,
        mated=n_mated,
        non_mated=n_non_mated,
        tpir=tpir,
        threshold=threshold,
        mate_rank=mate_rank,
        mate_score=mate_score,
        best_other=best_other,
        top_non_mated=top_non_mated,
    )


def _floats(values) -> list[float | None]:
    return [None if math.isnan(float(v)) else float(v) for v in values]


def _float(value) -> float | None:
    v = float(value)
    return None if math.isnan(v) else v


@dataclass
class IJB1NResult:
    name: str
    target: str
    mode: str
    fpir: np.ndarray
    galleries: dict[str, GallerySearch]  # "G1", "G2"
    labels: dict[str, str]  # "G1" -> its own name ("G1" or IJB-B's "S1")
    files: dict[str, str]  # "G1", "G2", "probe" -> file name
    probes: int
    images: int
    failed_images: int
    empty_templates: int
    precision: str = "float32"
    features_file: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tpir_mean(self) -> np.ndarray:
        return (self.galleries["G1"].tpir + self.galleries["G2"].tpir) / 2

    def rank(self, k: int) -> float:
        """(mates within the top k in G1 + in G2) / all probes."""
        return sum(self.galleries[g].within(k) for g in GALLERIES) / self.probes

    def cmc(self, max_rank: int | None = None) -> tuple[list[int], list[float]]:
        """Rank-k for k = 1 .. max_rank (default: the larger gallery, at least 10, at most 100)."""
        if max_rank is None:
            max_rank = max(max(RANKS), min(100, max(self.galleries[g].templates for g in GALLERIES)))
        counts = np.zeros(max_rank + 1, np.int64)
        for g in GALLERIES:
            ranks = self.galleries[g].mate_rank
            counts += np.bincount(np.minimum(ranks, max_rank + 1), minlength=max_rank + 2)[: max_rank + 1]
        within = np.cumsum(counts)[1:]
        return list(range(1, max_rank + 1)), [float(c) / self.probes for c in within]

    def shown(self) -> dict[str, list[float | None]]:
        """TPIR at FPIR 1e-4, 1e-3, 1e-2, 1e-1, 1 per gallery and the mean (fractions; None: undefined)."""
        idx = shown_indices(self.fpir.size - 1)
        rows = {g: self.galleries[g].tpir[idx] for g in GALLERIES}
        rows["mean"] = self.tpir_mean[idx]
        return {k: _floats(v) for k, v in rows.items()}

    def to_json(self) -> dict:
        ranks, rates = self.cmc()
        d = {
            "protocol": "1:N",
            "name": self.name,
            "target": self.target,
            "mode": self.mode,
            "fpir": [float(f) for f in self.fpir],
            "tpir": {**{g: _floats(self.galleries[g].tpir) for g in GALLERIES}, "mean": _floats(self.tpir_mean)},
            "threshold": {g: _floats(self.galleries[g].threshold) for g in GALLERIES},
            "rank": {str(k): self.rank(k) for k in RANKS},
            "shown": {"fpir": list(SHOWN_FPIRS), "tpir": self.shown()},
            "galleries": {
                g: {
                    "name": self.labels.get(g, g),
                    "file": self.files.get(g),
                    "templates": self.galleries[g].templates,
                    "mated": self.galleries[g].mated,
                    "non_mated": self.galleries[g].non_mated,
                }
                for g in GALLERIES
            },
            "probes": self.probes,
            "probe_file": self.files.get("probe"),
            "cmc": {"rank": ranks, "rate": rates},
            "images": self.images,
            "failed_images": self.failed_images,
            "empty_templates": self.empty_templates,
            "aggregation": self.precision,
        }
        if self.features_file:
            d["features_file"] = self.features_file
        d.update(self.extra)
        return d


def evaluate_features_1n(
    meta: IJBMeta,
    lists: IJB1NLists,
    feats: np.ndarray,
    name: str = "features",
    flip: bool = True,
    detector_score: bool = True,
    normalize_images: bool = False,
    source: str = "features",
    precision: str = "float32",
) -> IJB1NResult:
    """The 1:N protocol on image features in 5pts-file row order (module doc)."""
    tf, flip = aggregate_templates(
        meta,
        feats,
        flip,
        detector_score,
        normalize_images,
        source,
        precision,
        empty_note="they score 0 against every template",
    )
    fpirs = fpir_grid()

    def rows_of(ids: np.ndarray) -> np.ndarray:
        idx = template_index(tf.ids, ids)
        if (idx < 0).any():  # read_1n_lists(meta=...) checks this with the file and line
            raise ArcdeployError(f"template {int(ids[idx < 0][0])} has no image in the tid_mid file")
        return idx

    probe_rows = rows_of(lists.probes.ids)
    probe_feats = tf.features[probe_rows]
    galleries = {}
    for g in GALLERIES:
        lst = lists.galleries[g]
        res = search_gallery(probe_feats, lists.probes.subjects, tf.features[rows_of(lst.ids)], lst.subjects, fpirs)
        label = lists.labels.get(g, g)
        if not res.mated:
            log.warning("gallery %s: no probe's subject is enrolled there; its TPIR (and the mean) is undefined", label)
        if not res.non_mated:
            log.warning(
                "gallery %s: every probe is mated there, so no threshold can be set; TPIR is the rank-1 rate", label
            )
        galleries[g] = res
    return IJB1NResult(
        name=name,
        target=meta.target,
        mode=mode_name(flip, normalize_images, detector_score),
        fpir=fpirs,
        galleries=galleries,
        labels=dict(lists.labels),
        files={
            **{g: lists.galleries[g].path.name for g in GALLERIES},
            "probe": lists.probes.path.name,
        },
        probes=lists.probes.templates,
        images=meta.images,
        failed_images=tf.failed_images,
        empty_templates=tf.empty_templates,
        precision=precision,
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else "%.2f" % (100 * v)


def format_tpir_table(results: list[IJB1NResult]) -> str:
    """TPIR (%) at FPIR 1e-4 ... 1 per method and gallery (G1, G2, mean), as insightface prints it."""
    header = ["Methods", "gallery"] + [f"{f:g}" for f in SHOWN_FPIRS]
    body = []
    for r in results:
        shown = r.shown()
        for g in (*GALLERIES, "mean"):
            body.append([f"{r.name}-{r.target}", r.labels.get(g, g), *(_pct(v) for v in shown[g])])
    return box_table(header, body)


def format_rank_table(results: list[IJB1NResult]) -> str:
    """Rank-1/5/10 (%) per method."""
    header = ["Methods"] + [f"rank-{k}" for k in RANKS]
    return box_table(header, [[f"{r.name}-{r.target}", *(_pct(r.rank(k)) for k in RANKS)] for r in results])
