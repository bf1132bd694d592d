""".bin verification sets: both pickle encodings, hostile pickles refused, 10-fold accuracy
by hand and against a loop transcription of insightface's verification.py, real package runs."""

from __future__ import annotations

import json
import pickle
import pickletools

import numpy as np
import pytest
from sklearn.model_selection import KFold

from arcdeploy.cli import main as cli_main
from arcdeploy.demo.datasets import write_bin_set
from arcdeploy.errors import ArcdeployError
from arcdeploy.evaluate.binsets import (
    THRESHOLDS,
    decode_faces,
    evaluate_bins,
    fold_bounds,
    read_bin,
    verification_accuracy,
)

PAIRS = 10  # the fewest 10 folds allow: every image costs an inference on 2 cores


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    d = tmp_path_factory.mktemp("bins")
    return (
        write_bin_set(d / "syn_py3.bin", pairs=PAIRS, seed=1, encoding="py3"),
        write_bin_set(d / "syn_py2.bin", pairs=PAIRS, seed=1, encoding="py2-bytes"),
    )


# ------------------------------------------------------------------ reading


def test_both_encodings_read_the_same(bins):
    py3, py2 = bins
    with pytest.raises(UnicodeDecodeError):  # a genuine Python 2 pickle: needs encoding='bytes'
        pickle.loads(py2.read_bytes())
    ops = {op.name for op, _, _ in pickletools.genops(py2.read_bytes())}
    assert "BINSTRING" in ops or "SHORT_BINSTRING" in ops
    b3, s3 = read_bin(py3)
    b2, s2 = read_bin(py2)
    assert b3 == b2 and len(b3) == 2 * PAIRS and all(isinstance(b, bytes) for b in b2)
    np.testing.assert_array_equal(s3, s2)
    assert s3.dtype == bool and s3.sum() == PAIRS // 2
    faces = decode_faces(b3)
    assert faces.shape == (2 * PAIRS, 112, 112, 3) and faces.dtype == np.uint8 and faces.std() > 10


def test_numpy_issame_is_accepted_and_counts_must_match(bins, tmp_path):
    b, s = read_bin(bins[0])
    p = tmp_path / "np.bin"
    p.write_bytes(pickle.dumps((b, np.array(s)), protocol=2))
    b2, s2 = read_bin(p)
    assert b2 == b and (s2 == s).all()
    # an extra image used to be ignored (a subset scored silently): now both counts are named
    p.write_bytes(pickle.dumps((b + [b[0]], np.array(s)), protocol=2))
    with pytest.raises(ArcdeployError, match=f"{2 * PAIRS + 1} images for {PAIRS} pairs"):
        read_bin(p)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def test_hostile_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "evil.bin"
    p.write_bytes(pickle.dumps(([b"x", b"y"], [_Evil(marker)])))
    with pytest.raises(ArcdeployError) as exc:
        read_bin(p)
    msg = str(exc.value)
    assert "refused" in msg and "system" in msg and str(p) in msg and "\n" not in msg
    assert not marker.exists()
    p.write_bytes(pickle.dumps((["a"], eval)))  # builtins.eval as a global
    with pytest.raises(ArcdeployError, match="refused: the pickle asks for builtins.eval"):
        read_bin(p)


@pytest.mark.parametrize(
    "payload,expect",
    [
        (b"not a pickle at all", "not a readable .bin pickle"),
        (pickle.dumps({"bins": []}), "expected a pickled (bins, issame_list) pair"),
        (pickle.dumps(([b"a", b"b", b"c"], [True, False])), "3 images for 2 pairs"),
        (pickle.dumps(([b"a"] * 4, ["yes", "no"])), "issame_list must be"),
        (pickle.dumps(([1, 2], [True])), "bins must hold encoded image bytes"),
        (pickle.dumps(([b"a"] * 10, [True] * 5)), "needs at least 10"),
    ],
)
def test_malformed_bins(tmp_path, payload, expect):
    p = tmp_path / "bad.bin"
    p.write_bytes(payload)
    with pytest.raises(ArcdeployError) as exc:
        read_bin(p)
    assert expect in str(exc.value) and str(exc.value).startswith(str(p))
    with pytest.raises(ArcdeployError, match="no such .bin file"):
        read_bin(tmp_path / "missing.bin")


# ------------------------------------------------------------------ 10-fold accuracy


def _unit_pairs(dists):
    """Unit embeddings [2N, 2] whose partners are at the given squared L2 distances."""
    out = []
    for d in dists:
        c = 1 - d / 2
        out += [[1.0, 0.0], [c, np.sqrt(max(0.0, 1 - c * c))]]
    return np.array(out)


def test_ten_folds_by_hand():
    # 20 pairs, 2 per fold: same pairs at distance 0.555, different at 2.0; perfectly separable
    issame = np.array([True, False] * 10)
    dists = np.where(issame, 0.555, 2.0)
    r = verification_accuracy(_unit_pairs(dists), issame)
    assert r.accuracy == 1.0 and r.std == 0.0
    # the first best threshold is the first one above 0.555, i.e. 0.56
    np.testing.assert_allclose(r.fold_thresholds, 0.56, atol=1e-9)
    # fold 0's same pair is far (3.0): that fold's held-out accuracy drops to 1/2
    dists[0] = 3.0
    r = verification_accuracy(_unit_pairs(dists), issame)
    np.testing.assert_allclose(r.fold_accuracies, [0.5] + [1.0] * 9)
    assert r.accuracy == pytest.approx(0.95, abs=1e-12) and r.std == pytest.approx(0.15, abs=1e-12)


def insightface_calculate_roc(embeddings, actual_issame, nrof_folds=10):
    """A loop transcription of verification.py's calculate_roc (pca=0) -> fold accuracies."""
    thresholds = np.arange(0, 4, 0.01)
    e1, e2 = embeddings[0::2], embeddings[1::2]
    nrof_pairs = min(len(actual_issame), e1.shape[0])
    k_fold = KFold(n_splits=nrof_folds, shuffle=False)
    accuracy = np.zeros(nrof_folds)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)

    def acc_at(th, d, same):
        pred = np.less(d, th)
        tp = np.sum(np.logical_and(pred, same))
        tn = np.sum(np.logical_and(np.logical_not(pred), np.logical_not(same)))
        return float(tp + tn) / d.size

    for fold_idx, (train_set, test_set) in enumerate(k_fold.split(np.arange(nrof_pairs))):
        acc_train = np.zeros(len(thresholds))
        for i, th in enumerate(thresholds):
            acc_train[i] = acc_at(th, dist[train_set], actual_issame[train_set])
        best = np.argmax(acc_train)
        accuracy[fold_idx] = acc_at(thresholds[best], dist[test_set], actual_issame[test_set])
    return accuracy


@pytest.mark.parametrize("n,seed", [(100, 0), (123, 1), (57, 2)])
def test_matches_insightface_transcription(n, seed):
    rng = np.random.default_rng(seed)
    issame = rng.random(n) < 0.5
    base = rng.standard_normal((n, 8))
    other = np.where(issame[:, None], base + rng.normal(0, 0.9, (n, 8)), rng.standard_normal((n, 8)))
    emb = np.empty((2 * n, 8))
    emb[0::2], emb[1::2] = base, other
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    ref = insightface_calculate_roc(emb, issame)
    r = verification_accuracy(emb, issame)
    np.testing.assert_array_equal(r.fold_accuracies, ref)
    assert r.accuracy == np.mean(ref) and r.std == np.std(ref)
    assert 0.5 < r.accuracy < 1.0  # neither trivial nor perfect: the test can fail
    # fold layout is sklearn's KFold
    sizes = [len(t) for _, t in KFold(10).split(np.arange(n))]
    np.testing.assert_array_equal(np.diff(fold_bounds(n)), sizes)
    assert THRESHOLDS.size == 400


# ------------------------------------------------------------------ through a real package


def test_evaluate_bins_with_package(bins, r18_ort_fp32_pkg):
    from arcdeploy.package import load

    pkg = load(r18_ort_fp32_pkg)
    (res,) = evaluate_bins(pkg, [str(bins[1])], batch=10)  # the Python 2 encoding, end to end
    r = res.to_json()
    assert r["pairs"] == PAIRS and r["name"] == "syn_py2" and len(r["fold_accuracies"]) == 10
    assert 0 <= r["accuracy"] <= 1 and r["accuracy"] == np.mean(r["fold_accuracies"])
    # XNorm = mean L2 norm of the raw embeddings of the images and (separately) their mirrors
    faces = decode_faces(read_bin(bins[0])[0])
    raw = np.concatenate([pkg.infer(faces), pkg.infer(np.ascontiguousarray(faces[:, :, ::-1]))]).astype(np.float64)
    assert r["xnorm"] == pytest.approx(np.linalg.norm(raw, axis=1).mean(), rel=1e-5)
    assert r["xnorm"] > 1.5  # raw, not normalised
    # accuracy from those same raw features by the protocol: L2-normalise(image + mirror)
    emb = raw[: 2 * PAIRS] + raw[2 * PAIRS :]
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    acc = verification_accuracy(emb, read_bin(bins[0])[1])
    assert acc.accuracy == pytest.approx(r["accuracy"], abs=1e-12)


def test_cli_eval_bin(bins, r18_ort_fp32_pkg, tmp_path, capsys):
    js = tmp_path / "bins.json"
    rc = cli_main(["eval", "bin", str(r18_ort_fp32_pkg), str(bins[0]), "--json", str(js)])
    assert rc == 0
    out = capsys.readouterr()
    assert "syn_py3" in out.out and "Accuracy-Flip" in out.err
    doc = json.loads(js.read_text())
    assert [r["name"] for r in doc["results"]] == ["syn_py3"] and doc["results"][0]["pairs"] == PAIRS
    evil = tmp_path / "evil.bin"
    evil.write_bytes(pickle.dumps(([b"x"], [_Evil(tmp_path / "pwned")])))
    rc = cli_main(["eval", "bin", str(r18_ort_fp32_pkg), str(evil)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "refused" in err and not (tmp_path / "pwned").exists()
    rc = cli_main(["eval", "bin", str(bins[0])])
    assert rc == 2 and "no package given" in capsys.readouterr().err
