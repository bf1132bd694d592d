"""ROC and TAR@FAR: equal to sklearn's roc_curve and to insightface's point selection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from arcdeploy.evaluate.roc import FARS, format_tar_table, roc, tar_at_far


def insightface_tar(labels, scores, fars=FARS):
    """A direct transcription of eval_ijbc.py's table row (slow, loop based)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fpr = np.flipud(fpr)
    tpr = np.flipud(tpr)
    row = []
    for far in fars:
        _, min_index = min(list(zip(abs(fpr - far), range(len(fpr)))))
        row.append(tpr[min_index])
    return row


@pytest.mark.parametrize("seed", range(8))
def test_roc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 4000))
    levels = int(rng.integers(2, 40))
    scores = rng.standard_normal(n)
    if seed % 2:  # many exact ties
        scores = np.round(scores * levels) / levels
    labels = (rng.random(n) < rng.uniform(0.02, 0.7)).astype(np.int64)
    labels[:2] = [0, 1]
    ours = roc(labels, scores)
    ref = roc_curve(labels, scores)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


def test_roc_small_and_degenerate():
    # all scores equal: one threshold
    for a, b in zip(roc([0, 1, 0, 1], [0.5] * 4), roc_curve([0, 1, 0, 1], [0.5] * 4)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(roc([0, 1], [0.1, 0.2]), roc_curve([0, 1], [0.1, 0.2])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="both genuine"):
        roc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        roc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="0 .impostor. or 1"):
        roc([0, 2], [0.1, 0.2])


def test_tar_selection_ties_go_to_highest_tpr():
    # a vertical segment at fpr 0.5 and at fpr 0: the nearest FPR has several points
    fpr = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
    tpr = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    tars, chosen = tar_at_far(fpr, tpr, fars=(1e-6, 0.5, 0.9, 0.76))
    np.testing.assert_array_equal(tars, [0.25, 0.75, 1.0, 1.0])
    np.testing.assert_array_equal(chosen, [0.0, 0.5, 1.0, 1.0])
    # 0.74 is nearer 0.5 than 1.0: highest TPR at fpr 0.5
    assert tar_at_far(fpr, tpr, fars=(0.74,))[0][0] == 0.75


def test_tar_from_scores_by_hand():
    # impostors 0.9 0.1 0.2 0.3; genuine 0.95 0.8 0.85 0.05
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.2, 0.3, 0.95, 0.8, 0.85, 0.05])
    fpr, tpr, _ = roc(labels, scores)
    tars, _ = tar_at_far(fpr, tpr, fars=(0.0, 0.25, 0.5))
    # FAR 0: only 0.95 accepted -> 1/4; FAR 0.25 (0.9 accepted): 0.95, 0.85, 0.8 -> 3/4 is the highest at fpr .25
    np.testing.assert_array_equal(tars, [0.25, 0.75, 0.75])


@pytest.mark.parametrize("seed", range(5))
def test_tar_matches_insightface_transcription(seed):
    rng = np.random.default_rng(100 + seed)
    n_imp, n_gen = 200_000, 400
    scores = np.concatenate([rng.normal(0, 1, n_imp), rng.normal(3, 1, n_gen)])
    if seed % 2:
        scores = np.round(scores, 2)  # plateaus and ties
    labels = np.r_[np.zeros(n_imp, int), np.ones(n_gen, int)]
    fpr, tpr, _ = roc(labels, scores)
    tars, _ = tar_at_far(fpr, tpr)
    np.testing.assert_array_equal(tars, insightface_tar(labels, scores))
    assert ((tars >= 0) & (tars <= 1)).all() and np.all(np.diff(tars) >= 0)


def test_format_table():
    t = format_tar_table([("r18-IJBC", np.array([0.5, 0.6, 0.7, 0.81234, 0.9, 0.99999]))])
    lines = t.splitlines()
    assert lines[1].split("|")[1].strip() == "Methods"
    assert [c.strip() for c in lines[1].split("|")[2:-1]] == ["1e-06", "1e-05", "0.0001", "0.001", "0.01", "0.1"]
    row = [c.strip() for c in lines[3].split("|")[1:-1]]
    assert row == ["r18-IJBC", "50.00", "60.00", "70.00", "81.23", "90.00", "100.00"]
