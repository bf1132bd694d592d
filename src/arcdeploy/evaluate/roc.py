"""ROC and TAR@FAR exactly as insightface's IJB evaluation reports them.

insightface calls sklearn's ``roc_curve(label, score)`` (default
``drop_intermediate=True``; :func:`roc` gives the same arrays, faster), flips both arrays so that the highest TPR of an
FPR plateau comes first, and for each target FAR takes the first point of the
flipped curve whose ``|fpr - far|`` is smallest: nearest point, no
interpolation, ties going to the highest TPR. ``np.argmin`` returns the first
minimum, which is the same choice.
"""

from __future__ import annotations

import numpy as np

from ..tables import box_table

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)  # the FARs of insightface's TAR table, the one list here


def roc(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) equal, element for element, to sklearn's
    ``roc_curve(labels, scores)`` (default ``drop_intermediate=True``).

    Written out because sklearn's stable argsort of 15.6M scores dominates an
    IJB-C evaluation; the counts need no argsort: sorting the scores gives the
    distinct thresholds (ends of runs of equal scores, as sklearn takes them)
    and the genuine count at each comes from the sorted genuine scores.
    ``tests/test_roc.py`` checks equality with sklearn, ties included.
    """
    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size != s.size:
        raise ValueError(f"{y.size} labels for {s.size} scores")
    if y.size == 0:
        raise ValueError("no pairs to evaluate")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or infinity")
    pos = y == 1
    if not np.all(pos | (y == 0)):
        raise ValueError("labels must be 0 (impostor) or 1 (genuine)")
    n_pos = int(np.count_nonzero(pos))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError("the pairs need both genuine (1) and impostor (0) labels")
    desc = np.sort(s)[::-1]
    change = desc[1:] != desc[:-1]
    idx = np.flatnonzero(change)
    del change
    idx = np.append(idx, s.size - 1)
    thr = desc[idx]
    del desc
    genuine = np.sort(s[pos])
    # genuine scores >= each threshold (thresholds descend: search them ascending, then flip back)
    tps = (n_pos - np.searchsorted(genuine, thr[::-1], side="left")[::-1]).astype(np.float64)
    fps = 1.0 + idx.astype(np.float64) - tps
    del idx
    if fps.shape[0] > 2:
        keep = np.flatnonzero(np.concatenate([[True], np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), [True]]))
        fps, tps, thr = fps[keep], tps[keep], thr[keep]
    tps = np.concatenate([[0.0], tps])
    fps = np.concatenate([[0.0], fps])
    thr = np.concatenate([[np.inf], thr])
    return fps / fps[-1], tps / tps[-1], thr


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars=FARS) -> tuple[np.ndarray, np.ndarray]:
    """(TAR, the FPR of the chosen point) for each FAR: nearest ROC point, ties to the highest TPR."""
    fpr_f = np.asarray(fpr, dtype=np.float64)[::-1]
    tpr_f = np.asarray(tpr, dtype=np.float64)[::-1]
    idx = np.array([int(np.argmin(np.abs(fpr_f - far))) for far in fars], dtype=np.int64)
    return tpr_f[idx], fpr_f[idx]


def auc(fpr, tpr) -> float:
    from sklearn.metrics import auc as _auc

    return float(_auc(fpr, tpr))


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = 400) -> tuple[list[float], list[float]]:
    """A few hundred points of the curve, spread evenly on a log FPR axis, for plots and JSON.

    Each kept point is a real ROC point (the highest-TPR point at or below each grid FPR).
    """
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.size <= points:
        return fpr.tolist(), tpr.tolist()
    positive = fpr[fpr > 0]
    lo = positive.min() if positive.size else 1e-12
    grid = np.geomspace(lo, 1.0, points)
    # fpr is non-decreasing: the last index with fpr <= g has the highest TPR at that FPR
    idx = np.searchsorted(fpr, grid, side="right") - 1
    idx = np.unique(np.concatenate([[0], idx[idx >= 0], [fpr.size - 1]]))
    return fpr[idx].tolist(), tpr[idx].tolist()


def format_tar_table(rows: list[tuple[str, np.ndarray]], fars=FARS) -> str:
    """The TAR@FAR table as insightface prints it: one row per method, columns are the FARs,
    percentages with 2 decimals."""
    header = ["Methods"] + [str(f) for f in fars]
    body = [[name] + ["%.2f" % (float(t) * 100) for t in tars] for name, tars in rows]
    return box_table(header, body)
