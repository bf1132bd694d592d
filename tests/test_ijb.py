"""IJB-B/IJB-C 1:1 verification: aggregation by hand, parity with a transcription of insightface's
eval_ijbc.py arithmetic (near-tied scores included), every meta-file error, the CLI from features and
from a package."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn.preprocessing
from sklearn.metrics import roc_curve

from arcdeploy.cli import main as cli_main
from arcdeploy.errors import ArcdeployError
from arcdeploy.evaluate.ijb import (
    evaluate_features,
    evaluate_ijb,
    pair_scores,
    read_meta,
    settle_near_ties,
    template_features,
)
from arcdeploy.evaluate.roc import roc, tar_at_far


def write_meta(root: Path, rows, pairs, target="IJBC", pts=None):
    """rows: (name, tid, mid, score); pairs: (t1, t2, label)."""
    t = target.lower()
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / f"{t}_face_tid_mid.txt").write_text("".join(f"{n} {a} {b}\n" for n, a, b, _ in rows))
    pts = pts if pts is not None else [[10.0 + i] * 10 for i in range(len(rows))]
    (meta / f"{t}_name_5pts_score.txt").write_text(
        "".join(f"{n} " + " ".join(f"{v:.2f}" for v in p) + f" {s}\n" for (n, _, _, s), p in zip(rows, pts))
    )
    (meta / f"{t}_template_pair_label.txt").write_text("".join(f"{a} {b} {c}\n" for a, b, c in pairs))
    return root


# ------------------------------------------------------------------ by hand

HAND_ROWS = [("a.jpg", 7, 1, 0.5), ("b.jpg", 7, 1, 0.5), ("c.jpg", 7, 2, 1.0), ("d.jpg", 9, 5, 0.25)]
HAND_IMG = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 5.0]])


def test_template_aggregation_by_hand():
    templates = np.array([r[1] for r in HAND_ROWS])
    medias = np.array([r[2] for r in HAND_ROWS])
    faceness = np.array([r[3] for r in HAND_ROWS], np.float32)
    # N1 D0: media 1 mean (2, 0) + media 2 (0, 2) = (2, 2) -> (1, 1)/sqrt2; template 9 -> (0, 1)
    tf = template_features(HAND_IMG, templates, medias, None)
    np.testing.assert_array_equal(tf.ids, [7, 9])
    np.testing.assert_allclose(tf.features, [[2**-0.5, 2**-0.5], [0, 1]], rtol=1e-15)
    # D1: media 1 mean 0.5*(1,0),0.5*(3,0) -> (1, 0); media 2 (0, 2) -> (1, 2)/sqrt5
    tf = template_features(HAND_IMG, templates, medias, faceness)
    np.testing.assert_allclose(tf.features[0], np.array([1, 2]) / 5**0.5, rtol=1e-15)
    # N0 D0: each image normalised first: (1,0),(1,0) -> (1,0); (0,1) -> (1,1)/sqrt2
    tf = template_features(HAND_IMG, templates, medias, None, normalize_images=True)
    np.testing.assert_allclose(tf.features[0], [2**-0.5, 2**-0.5], rtol=1e-15)
    # score = dot product of the two templates
    tf = template_features(HAND_IMG, templates, medias, faceness)
    s = pair_scores(tf.features, np.array([0, 1]), np.array([1, 0]))
    np.testing.assert_allclose(s, [2 / 5**0.5] * 2, rtol=1e-15)


def test_flip_sum_of_raw_features_by_hand():
    templates, medias = np.array([1, 1, 2]), np.array([1, 2, 3])
    feats = np.array([[[1, 0], [1, 2]], [[0, 1], [0, 3]], [[5, 5], [-5, 5]]], np.float32)  # [N, 2, D]
    # F1: (2,2) + (0,4) = (2,6); F0: (1,0)+(0,1) = (1,1)
    tf = template_features(feats, templates, medias, None, flip=True)
    np.testing.assert_allclose(tf.features, [np.array([2, 6]) / 40**0.5, [0, 1]], rtol=1e-15)
    tf = template_features(feats, templates, medias, None, flip=False)
    np.testing.assert_allclose(tf.features, [[2**-0.5, 2**-0.5], [2**-0.5, 2**-0.5]], rtol=1e-15)


def test_failed_images_are_left_out():
    templates, medias = np.array([1, 1, 1, 2]), np.array([1, 1, 2, 3])
    feats = np.array([[1, 0], [np.nan, 1], [0, 3], [np.nan, np.nan]])
    tf = template_features(feats, templates, medias, None)
    # media 1 = only (1,0); media 2 = (0,3) -> (1,3); template 2 empty
    np.testing.assert_allclose(tf.features[0], np.array([1, 3]) / 10**0.5, rtol=1e-15)
    np.testing.assert_array_equal(tf.features[1], [0, 0])
    assert (tf.failed_images, tf.empty_templates) == (2, 1)


def test_pair_scores_gemm_and_gather_paths_agree():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((300, 16))
    i1, i2 = rng.integers(0, 300, 5000), rng.integers(0, 300, 5000)
    want = np.einsum("ij,ij->i", f[i1], f[i2])
    for ratio in (1e9, 0.0):  # always gemm, always gather
        np.testing.assert_allclose(pair_scores(f, i1, i2, block=64, gemm_ratio=ratio), want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ parity with insightface


def insightface_reference(feats, templates, medias, faceness, p1, p2, labels, flip, norm_score, detector_score):
    """A slow transcription of eval_ijbc.py's arithmetic (image2template_feature, verification, the TAR row),
    dtype for dtype: its features are stored float32 [N, 2D] (image | flip), numpy keeps float32 through the
    flip sum, N0, the faceness product and the media means and sums; the template rows are float64 from
    there on (sklearn's normalize); scores are product-and-sum in batches of 100000 pairs."""
    n, d = feats.shape[0], feats.shape[-1]
    stored = np.zeros((n, 2 * d), np.float32)
    if feats.ndim == 3:
        stored[:, :d], stored[:, d:] = feats[:, 0], feats[:, 1]
    else:
        stored[:, :d] = feats
    half = stored.shape[1] // 2
    x = stored[:, :half] + stored[:, half:] if (flip and feats.ndim == 3) else stored[:, :half]
    if not norm_score:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if detector_score:
        x = x * np.asarray(faceness, np.float32)[:, np.newaxis]
    unique_templates = np.unique(templates)
    tfe = np.zeros((len(unique_templates), x.shape[1]))
    for row, uqt in enumerate(unique_templates):
        (ind_t,) = np.where(templates == uqt)
        face, fm = x[ind_t], medias[ind_t]
        media_feats = []
        for u, count in zip(*np.unique(fm, return_counts=True)):
            (ind_m,) = np.where(fm == u)
            media_feats.append(face[ind_m] if count == 1 else np.mean(face[ind_m], axis=0, keepdims=True))
        tfe[row] = np.sum(np.array(media_feats), axis=0)
    tfe = sklearn.preprocessing.normalize(tfe)
    row_of = np.zeros((max(unique_templates) + 1, 1), dtype=int)
    for row, uqt in enumerate(unique_templates):
        row_of[uqt] = row
    score = np.zeros(len(p1))
    for s in range(0, len(p1), 100000):
        k = np.arange(s, min(len(p1), s + 100000))
        score[k] = np.sum(tfe[row_of[p1[k]]] * tfe[row_of[p2[k]]], -1).flatten()
    fpr, tpr, _ = roc_curve(labels, score)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tars = []
    for far in [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]:
        _, i = min(list(zip(abs(fpr - far), range(len(fpr)))))
        tars.append(tpr[i])
    return score, tars


@pytest.fixture(scope="module")
def random_set(tmp_path_factory):
    rng = np.random.default_rng(7)
    n_id, tpl_per_id = 30, 3
    rows, ident, feats = [], {}, []
    centers = rng.standard_normal((n_id, 32))
    k = 0
    for i in range(n_id):
        for j in range(tpl_per_id):
            tid = 1000 + 10 * i + j
            ident[tid] = i
            for _ in range(int(rng.integers(1, 5))):
                mid = int(rng.integers(0, 4))  # media ids repeat across templates on purpose
                k += 1
                rows.append((f"img{k}.jpg", tid, mid, float(np.float32(rng.uniform(0.3, 1.0)))))
                base = centers[i] * 0.6 + rng.standard_normal(32)
                feats.append([base * rng.uniform(0.5, 3), base * rng.uniform(0.5, 3) + 0.2 * rng.standard_normal(32)])
    tids = sorted(ident)
    pairs = [(a, b, int(ident[a] == ident[b])) for x, a in enumerate(tids) for b in tids[x + 1 :]]
    root = write_meta(tmp_path_factory.mktemp("ijb") / "IJBC", rows, pairs)
    feats = np.array(feats, np.float32)
    np.save(root / "feats.npy", feats)
    return root, feats


@pytest.mark.parametrize(
    "flip,normalize,detector", [(True, False, True), (False, False, True), (True, True, False), (True, True, True)]
)
def test_parity_with_insightface_transcription(random_set, flip, normalize, detector):
    root, feats = random_set
    meta = read_meta(root, "IJBC")
    res = evaluate_features(meta, feats, flip=flip, detector_score=detector, normalize_images=normalize)
    ref_scores, ref_tars = insightface_reference(
        feats,
        meta.templates,
        meta.medias,
        meta.faceness,
        meta.pair_t1,
        meta.pair_t2,
        meta.labels,
        flip,
        not normalize,
        detector,
    )
    np.testing.assert_allclose(res.scores, ref_scores, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(res.tar, ref_tars)
    assert res.mode == f"F{int(flip)} N{int(not normalize)} D{int(detector)}"
    assert res.pairs == len(ref_scores) and res.genuine == int(meta.labels.sum())
    # the genuine pairs score higher than chance: the set has signal, so TAR@1e-1 is not trivially 0
    assert res.tar[-1] > 0.3


def near_tied_set(seed, n_t=100, d=16):
    """Templates whose features all lie within ~1e-4 (relative) of one direction, so the 4950 pair scores
    crowd into a band where float32 rounding of the aggregation decides their order."""
    rng = np.random.default_rng(seed)
    base, dirs = rng.standard_normal(d), rng.standard_normal((5, d))
    ident = rng.integers(0, 5, n_t)
    rows, feats = [], []
    for t in range(n_t):
        for m in range(int(rng.integers(1, 4))):
            for _ in range(int(rng.integers(1, 4))):
                v = (base + 2e-5 * dirs[ident[t]] + 1e-4 * rng.standard_normal(d)) * rng.uniform(5, 30)
                feats.append([v, v * rng.uniform(0.9, 1.1) + 1e-4 * rng.standard_normal(d)])
                rows.append((100 + t, m + 10 * (t % 3), float(np.float32(rng.uniform(0.5, 1)))))
    a, b = np.triu_indices(n_t, 1)
    rows = np.array(rows)
    return (
        np.array(feats, np.float32),
        rows[:, 0].astype(int),
        rows[:, 1].astype(int),
        rows[:, 2].astype(np.float32),
        100 + a,
        100 + b,
        (ident[a] == ident[b]).astype(int),
    )


@pytest.mark.parametrize("flip,normalize,detector", [(True, False, True), (False, False, True), (True, True, False)])
def test_near_tied_scores_rank_as_insightface(flip, normalize, detector):
    float64_differs = False
    for seed in range(8):
        feats, templates, medias, faceness, p1, p2, labels = near_tied_set(seed)
        ref_scores, ref_tars = insightface_reference(
            feats, templates, medias, faceness, p1, p2, labels, flip, not normalize, detector
        )
        got = {}
        for precision in ("float32", "float64"):
            tf = template_features(
                feats,
                templates,
                medias,
                faceness if detector else None,
                flip=flip,
                normalize_images=normalize,
                precision=precision,
            )
            i1, i2 = np.searchsorted(tf.ids, p1), np.searchsorted(tf.ids, p2)
            scores = pair_scores(tf.features, i1, i2)
            if precision == "float32":
                settle_near_ties(scores, tf.features, i1, i2)
            fpr, tpr, _ = roc(labels, scores)
            got[precision] = scores, list(tar_at_far(fpr, tpr)[0])
        scores, tars = got["float32"]
        assert tars == ref_tars, seed
        # every score in the same place as insightface's, ties included
        np.testing.assert_array_equal(np.argsort(scores, kind="stable"), np.argsort(ref_scores, kind="stable"))
        np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-13)
        # the set is sensitive: float64 aggregation ranks the scores differently
        assert not np.array_equal(np.argsort(got["float64"][0], kind="stable"), np.argsort(ref_scores, kind="stable"))
        float64_differs |= got["float64"][1] != ref_tars
    if (flip, normalize, detector) == (True, False, True):
        assert float64_differs  # and on some of these sets that moves a TAR


# ------------------------------------------------------------------ errors name the file and line

GOOD_ROWS = [("a.jpg", 1, 1, 0.9), ("b.jpg", 1, 2, 0.8), ("c.jpg", 2, 3, 0.7), ("d.jpg", 3, 4, 0.6)]
GOOD_PAIRS = [(1, 2, 1), (1, 3, 0), (2, 3, 0)]


def _err(root, target="IJBC") -> str:
    with pytest.raises(ArcdeployError) as exc:
        read_meta(root, target)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_good_meta_reads(tmp_path):
    m = read_meta(write_meta(tmp_path / "r", GOOD_ROWS, GOOD_PAIRS), "ijbc")
    assert m.images == 4 and m.target == "IJBC"
    np.testing.assert_array_equal(m.templates, [1, 1, 2, 3])
    np.testing.assert_array_equal(m.labels, [1, 0, 0])
    assert m.landmarks.shape == (4, 5, 2) and m.faceness.dtype == np.float32
    np.testing.assert_array_equal(m.pair_i1, [0, 0, 1])


def test_missing_meta_file(tmp_path):
    root = write_meta(tmp_path / "r", GOOD_ROWS, GOOD_PAIRS)
    (root / "meta" / "ijbc_template_pair_label.txt").unlink()
    assert "ijbc_template_pair_label.txt: missing IJB meta file" in _err(root)
    assert "IJBB" in _err(root, "IJBB") or "ijbb" in _err(root, "IJBB")
    assert "not a folder" in _err(tmp_path / "nowhere")
    with pytest.raises(ArcdeployError, match="unknown IJB target"):
        read_meta(root, "LFW")


def test_row_count_mismatch(tmp_path):
    root = write_meta(tmp_path / "r", GOOD_ROWS, GOOD_PAIRS)
    p = root / "meta" / "ijbc_name_5pts_score.txt"
    p.write_text("".join(p.read_text().splitlines(keepends=True)[:3]))
    msg = _err(root)
    assert "ijbc_name_5pts_score.txt: 3 rows" in msg and "has 4" in msg


@pytest.mark.parametrize(
    "file,line,text,expect",
    [
        ("ijbc_face_tid_mid.txt", 2, "b.jpg 1\n", "line 2: expected 3 fields"),
        ("ijbc_face_tid_mid.txt", 3, "c.jpg two 3\n", "line 3: template id 'two' is not an integer"),
        ("ijbc_name_5pts_score.txt", 4, "d.jpg 1 2 3\n", "line 4: expected 12 fields"),
        (
            "ijbc_name_5pts_score.txt",
            1,
            "a.jpg 1 2 3 4 5 6 7 8 9 x 0.5\n",
            "line 1: landmark or score field is not a number",
        ),
        ("ijbc_name_5pts_score.txt", 2, "b.jpg 1 2 3 4 5 6 7 8 9 10 nan\n", "line 2: landmark or score is not finite"),
        ("ijbc_template_pair_label.txt", 2, "1 3\n", "line 2: expected 3 fields"),
        ("ijbc_template_pair_label.txt", 3, "2 3 7\n", "line 3: label 7 is not 0 or 1"),
        ("ijbc_template_pair_label.txt", 1, "1 2.5 1\n", "line 1: template id '2.5' is not an integer"),
        ("ijbc_template_pair_label.txt", 3, "2 42 0\n", "line 3: template 42 has no image"),
    ],
)
def test_malformed_lines(tmp_path, file, line, text, expect):
    root = write_meta(tmp_path / "r", GOOD_ROWS, GOOD_PAIRS)
    p = root / "meta" / file
    lines = p.read_text().splitlines(keepends=True)
    lines[line - 1] = text
    p.write_text("".join(lines))
    msg = _err(root)
    assert msg.startswith(str(p)) and expect in msg, msg


def test_blank_lines_keep_line_numbers(tmp_path):
    root = write_meta(tmp_path / "r", GOOD_ROWS, GOOD_PAIRS)
    p = root / "meta" / "ijbc_template_pair_label.txt"
    p.write_text("1 2 1\n\n1 3 0\n2 99 0\n")
    assert "line 4: template 99 has no image" in _err(root)
    p.write_text("1 2 1\n\n1 3 0\n2 3 0\n")
    np.testing.assert_array_equal(read_meta(root, "IJBC").labels, [1, 0, 0])


def test_features_of_the_wrong_shape(tmp_path):
    meta = read_meta(write_meta(tmp_path / "r", GOOD_ROWS, GOOD_PAIRS), "IJBC")
    for bad, expect in [
        (np.zeros((3, 8), np.float32), "3 feature rows but the 5pts file has 4"),
        (np.zeros((4, 3, 8), np.float32), "must be [N, D] or [N, 2, D]"),
        (np.zeros((4,), np.float32), "must be [N, D] or [N, 2, D]"),
        (np.zeros((4, 8), np.int64), "floating point"),
    ]:
        with pytest.raises(ArcdeployError, match=expect.replace("[", r"\[").replace("]", r"\]")):
            evaluate_features(meta, bad, source="x.npy")


# ------------------------------------------------------------------ CLI from features


def test_cli_from_features(random_set, tmp_path, capsys):
    root, feats = random_set
    f2 = tmp_path / "noflip.npy"
    np.save(f2, feats[:, 0])
    out, js = tmp_path / "out", tmp_path / "r.json"
    rc = cli_main(
        [
            "eval",
            "ijb",
            "--root",
            str(root),
            "--target",
            "IJBC",
            "--features",
            str(root / "feats.npy"),
            "--features",
            str(f2),
            "--json",
            str(js),
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| feats-IJBC " in printed and "| noflip-IJBC " in printed and "0.0001" in printed
    doc = json.loads(js.read_text())
    assert doc["target"] == "IJBC" and doc["far"] == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
    assert len(doc["tar"]) == 6 and all(0 <= t <= 1 for t in doc["tar"])
    assert [r["mode"] for r in doc["results"]] == ["F1 N1 D1", "F0 N1 D1"]
    assert doc["tar"] == doc["results"][0]["tar"]
    assert doc["pairs"] == doc["genuine"] + doc["impostor"] and doc["templates"] == 90
    assert (out / "roc.png").stat().st_size > 1000
    scores = np.load(out / "feats_ijbc_scores.npy")
    assert scores.shape == (doc["pairs"],) and scores.dtype == np.float64
    # the table's percentages are the JSON's fractions
    assert f"{100 * doc['tar'][-1]:.2f}" in printed


def test_cli_errors_are_one_line(random_set, tmp_path, capsys):
    root, feats = random_set
    np.save(tmp_path / "short.npy", feats[:5])
    rc = cli_main(
        ["eval", "ijb", "--root", str(root), "--features", str(tmp_path / "short.npy"), "-o", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "5 feature rows" in err and "short.npy" in err
    rc = cli_main(
        ["eval", "ijb", "--root", str(root), "--features", str(tmp_path / "none.npy"), "-o", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "none.npy: no such features file" in err
    rc = cli_main(["eval", "ijb", "--root", str(root), "-o", str(tmp_path / "o")])
    assert rc == 2 and "give one or more packages" in capsys.readouterr().err


# ------------------------------------------------------------------ from a package (real pipeline)


@pytest.fixture(scope="module")
def small_ijb(tmp_path_factory):
    from arcdeploy.demo.datasets import write_ijb_set

    return write_ijb_set(
        tmp_path_factory.mktemp("ijbset") / "IJB_release" / "IJBC",
        target="IJBC",
        identities=4,
        templates_per_id=2,
        images_per_template=3,
        seed=0,
    )


def test_synthetic_set_layout(small_ijb):
    meta = read_meta(small_ijb, "IJBC")
    assert meta.images == 24 and len(np.unique(meta.templates)) == 8 and meta.name_mismatches == 0
    assert int(meta.labels.sum()) == 4 and meta.labels.size == 28
    assert all(p.exists() for p in meta.image_paths())
    # the first two images of each template share a media
    assert len(np.unique(np.c_[meta.templates, meta.medias], axis=0)) == 16
    assert ((meta.faceness > 0.5) & (meta.faceness < 1)).all()


def test_package_path_caches_resumes_and_matches_features(small_ijb, r18_ort_fp32_pkg, tmp_path):
    out = tmp_path / "out"
    doc = evaluate_ijb(small_ijb, "IJBC", packages=[str(r18_ort_fp32_pkg)], out_dir=out, progress=False, batch=8)
    r = doc["results"][0]
    assert r["mode"] == "F1 N1 D1" and r["images"] == 24 and r["failed_images"] == 0
    cache = Path(r["features_file"])
    feats = np.load(cache)
    assert feats.shape == (24, 2, 512) and np.isfinite(feats).all()
    # raw features: not unit norm; the flipped copy differs from the image
    assert not np.allclose(np.linalg.norm(feats[:, 0], axis=1), 1.0)
    assert not np.allclose(feats[:, 0], feats[:, 1])
    # the same numbers from the cached features through --features
    doc2 = evaluate_ijb(small_ijb, "IJBC", features=[str(cache)], out_dir=tmp_path / "out2", plot=False)
    assert doc2["tar"] == doc["tar"] and doc2["auc"] == doc["auc"]
    np.testing.assert_array_equal(np.load(doc2["scores_file"]), np.load(doc["scores_file"]))
    # a second run resumes from the cache (same file, same result)
    mtime = cache.stat().st_mtime_ns
    doc3 = evaluate_ijb(
        small_ijb, "IJBC", packages=[str(r18_ort_fp32_pkg)], out_dir=out, progress=False, plot=False, force=True
    )  # its result files exist: replacing them is asked for
    assert doc3["tar"] == doc["tar"] and cache.stat().st_mtime_ns == mtime


def test_package_cli_no_flip(small_ijb, r18_ort_fp32_pkg, tmp_path, capsys):
    js = tmp_path / "r.json"
    rc = cli_main(
        [
            "eval",
            "ijb",
            str(r18_ort_fp32_pkg),
            "--root",
            str(small_ijb),
            "--no-flip",
            "--no-detector-score",
            "--normalize-images",
            "--no-progress",
            "--json",
            str(js),
            "-o",
            str(tmp_path / "o"),
        ]
    )
    assert rc == 0
    doc = json.loads(js.read_text())
    assert doc["mode"] == "F0 N0 D0"
    assert np.load(doc["features_file"]).shape == (24, 512)
