"""IJB 1:N open-set identification: hand-checked searches (ties, a mate at rank 2, a score equal to the
threshold, galleries with only mated or no mated probes, the threshold index at small n), parity with a
straightforward reference written from insightface's ijb_evals.py arithmetic on a random set, the 1:N list
files and their errors, the JSON, the CLI from features, one extraction for both protocols from a package,
the demo's set, and the trained w600k_mbf on real LFW faces (benchmarks/ijb_1n_from_lfw.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import sklearn.preprocessing

from arcdeploy.cli import main as cli_main
from arcdeploy.errors import ArcdeployError
from arcdeploy.evaluate.ijb import (
    evaluate_features_1n,
    evaluate_ijb,
    evaluate_packages,
    evaluate_protocols,
    fpir_grid,
    read_1n_lists,
    read_meta,
    search_gallery,
    threshold_index,
)
from real_material import REAL, needs_real

# ------------------------------------------------------------------ by hand

# gallery = unit vectors, so a probe's feature row IS its score row against subjects 10, 20, 30
GALLERY_SUBJECTS = np.array([10, 20, 30])
HAND_PROBES = [
    (10, [0.70, 0.20, 0.10]),  # mate at rank 1, score 0.7
    (20, [0.70, 0.60, 0.10]),  # mate at rank 2 (subject 10's template scores higher)
    (30, [0.30, 0.30, 0.30]),  # mate tied with both others: not rank 1, and rank 3 (a tie counts against it)
    (10, [0.65, 0.10, 0.00]),  # mate at rank 1 with exactly the middle threshold
    (99, [0.10, 0.80, 0.20]),  # non-mated, top 0.80
    (98, [0.50, 0.40, 0.00]),  # non-mated, top 0.50
    (97, [0.20, 0.00, 0.65]),  # non-mated, top 0.65
]


def hand_search(probes=HAND_PROBES, fpirs=None):
    subjects = np.array([s for s, _ in probes])
    feats = np.array([row for _, row in probes], np.float64)
    return search_gallery(feats, subjects, np.eye(3), GALLERY_SUBJECTS, fpirs)


def test_fpir_grid_is_insightfaces():
    grid = fpir_grid()
    assert grid.size == 101 and grid.dtype == np.float64
    assert list(grid) == [10**v for v in np.arange(-4, 0, 4 / 100)] + [1]
    assert grid[0] == 1e-4 and grid[-1] == 1.0
    # the shown points are every 25th, not round numbers: 1e-2 is 0.01000000000000004
    np.testing.assert_allclose(grid[::25], [1e-4, 1e-3, 1e-2, 1e-1, 1], rtol=1e-13)
    assert grid[50] != 0.01


@pytest.mark.parametrize(
    "n,fpir,index",
    [
        (1, 1e-4, 0),
        (1, 1.0, 0),
        (3, 0.5, 0),  # int(1.5) - 1 = 0
        (3, 0.6, 0),
        (3, 0.7, 1),  # int(2.1) - 1
        (3, 1.0, 2),
        (10, 0.1, 0),  # int(1.0) - 1
        (10, 0.19, 0),
        (10, 0.2, 1),
        (100, fpir_grid()[50], 0),  # int(1.0000000000000004) - 1
        (1000, fpir_grid()[75], 99),  # int(100.00000000000062) - 1
        (5, 0.0, 0),
    ],
)
def test_threshold_index_at_small_n(n, fpir, index):
    assert threshold_index(n, fpir) == index


def test_hand_search_thresholds_ties_and_rank_two():
    res = hand_search(fpirs=[1e-4, 0.5, 0.7, 1.0])
    assert (res.mated, res.non_mated, res.templates) == (4, 3, 3)
    # non-mated tops descending: 0.80, 0.65, 0.50; index max(int(3 f) - 1, 0) -> 0, 0, 1, 2
    np.testing.assert_array_equal(res.threshold, [0.80, 0.80, 0.65, 0.50])
    # hits need rank 1 (strictly above every other template) and a score strictly above the threshold:
    # at 0.80 none; at 0.65 only the 0.70 mate (0.65 is not > 0.65); at 0.50 both rank-1 mates
    np.testing.assert_array_equal(res.tpir, [0, 0, 1 / 4, 2 / 4])
    np.testing.assert_array_equal(res.mate_rank, [1, 2, 3, 1])
    assert [res.within(k) for k in (1, 2, 3, 5)] == [2, 3, 4, 4]
    np.testing.assert_array_equal(res.mate_score, [0.70, 0.60, 0.30, 0.65])
    np.testing.assert_array_equal(res.best_other, [0.20, 0.70, 0.30, 0.10])


def test_tie_between_mate_and_another_template_is_a_miss():
    probes = [(10, [0.5, 0.5, 0.1]), (20, [0.1, 0.6, 0.6]), (77, [0.2, 0.2, 0.2])]
    res = hand_search(probes, fpirs=[1.0])
    # both mates tie with one other template: rank 2, never a hit, even above the threshold 0.2
    np.testing.assert_array_equal(res.mate_rank, [2, 2])
    np.testing.assert_array_equal(res.tpir, [0.0])
    assert res.within(1) == 0 and res.within(2) == 2


def test_gallery_where_every_probe_is_mated_and_one_with_none():
    every = hand_search([(10, [0.9, 0.1, 0.0]), (20, [0.1, 0.2, 0.3]), (30, [0.0, 0.0, 0.1])])
    # no non-mated probe: no threshold (NaN), every rank-1 mate is a hit at every FPIR
    assert every.non_mated == 0 and np.isnan(every.threshold).all()
    np.testing.assert_array_equal(every.tpir, np.full(101, 2 / 3))
    none = hand_search([(55, [0.9, 0.1, 0.0]), (66, [0.1, 0.2, 0.3])])
    # no mated probe: TPIR undefined
    assert none.mated == 0 and np.isnan(none.tpir).all()
    np.testing.assert_array_equal(none.threshold[[0, -1]], [0.9, 0.3])


def test_gallery_of_one_template_and_duplicate_subject():
    res = search_gallery(np.array([[0.3], [0.9]]), np.array([1, 2]), np.array([[1.0]]), np.array([1]), [1.0])
    # the mate has no competitor: rank 1; the threshold is the one non-mated top, 0.9 > 0.3
    np.testing.assert_array_equal(res.mate_rank, [1])
    np.testing.assert_array_equal(res.tpir, [0.0])
    with pytest.raises(ArcdeployError, match="one template per subject"):
        search_gallery(np.eye(2), np.array([1, 2]), np.eye(2), np.array([5, 5]))


# ------------------------------------------------------------------ files


def write_1n_set(root: Path, rows, lists, target="IJBC", pairs=True):
    """rows: (image name, template id, media id, faceness); lists: {"G1"|"G2"|"probe": [(tid, subject), ...]},
    each template's rows naming its images in tid_mid order."""
    t = target.lower()
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / f"{t}_face_tid_mid.txt").write_text("".join(f"{n} {a} {b}\n" for n, a, b, _ in rows))
    (meta / f"{t}_name_5pts_score.txt").write_text(
        "".join(f"{n} " + " ".join(["50.0"] * 10) + f" {s}\n" for n, _, _, s in rows)
    )
    if pairs:
        tids = sorted({r[1] for r in rows})
        (meta / f"{t}_template_pair_label.txt").write_text(
            "".join(f"{a} {b} {int(i % 3 == 0)}\n" for i, (a, b) in enumerate(zip(tids, tids[1:])))
        )
    names = {"G1": "gallery_G1", "G2": "gallery_G2", "probe": "probe_mixed"}
    if target.upper() == "IJBB":
        names.update(G1="gallery_S1", G2="gallery_S2")
    for key, entries in lists.items():
        lines = ["TEMPLATE_ID,SUBJECT_ID,FILENAME,MEDIA"]
        for tid, subject in entries:
            lines += [f"{tid},{subject},{n},{m}" for n, a, m, _ in rows if a == tid]
        (meta / f"{t}_1N_{names[key]}.csv").write_text("\n".join(lines) + "\n")
    return root


def random_1n_set(tmp: Path, seed=3, n_subjects=40, enrolled=12, dim=24, target="IJBC"):
    """Subjects 0..enrolled-1 in G1, enrolled..2*enrolled-1 in G2, the rest in no gallery; each subject has a
    gallery template (if enrolled) and 1-3 probe templates of 1-4 images in 1-3 media; features of a subject
    share a centre, so the search has signal but is far from perfect."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_subjects, dim))
    rows, feats = [], []
    lists: dict[str, list] = {"G1": [], "G2": [], "probe": []}
    tid, image = 100, 0
    for s in range(n_subjects):
        kinds = (["G1"] if s < enrolled else ["G2"] if s < 2 * enrolled else []) + ["probe"] * int(rng.integers(1, 4))
        for kind in kinds:
            tid += int(rng.integers(1, 4))  # template ids with gaps
            lists[kind].append((tid, 1000 + s))
            for _ in range(int(rng.integers(1, 5))):
                image += 1
                rows.append((f"{image}.jpg", tid, int(rng.integers(0, 3)), float(np.float32(rng.uniform(0.4, 1)))))
                base = 0.55 * centres[s] + rng.standard_normal(dim)
                feats.append([base * rng.uniform(0.5, 2), base * rng.uniform(0.5, 2) + 0.3 * rng.standard_normal(dim)])
    root = write_1n_set(tmp / target, rows, lists, target=target)
    feats = np.array(feats, np.float32)
    np.save(root / "feats.npy", feats)
    return root, feats


@pytest.fixture(scope="module")
def random_set(tmp_path_factory):
    return random_1n_set(tmp_path_factory.mktemp("ijb1n"))


def reference_1n(feats, meta, lists_files, flip, normalize, detector):
    """A straightforward reading of insightface's run_model_test_1N / evaluation_1N, loop by loop: image
    features as stored (float32), flip sum, N0, faceness; per listed template (np.unique of its csv
    column, subject of the first row) the media means summed, sklearn's normalize; per gallery a full
    np.dot of probes and gallery, Python comparisons per probe."""
    x = feats[:, 0] + feats[:, 1] if flip else feats[:, 0].copy()
    if normalize:
        x = x / np.sqrt(np.sum(x**2, -1, keepdims=True))
    if detector:
        x = x * meta.faceness[:, np.newaxis]

    def templates_of(path):
        data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 1), dtype=np.int64, ndmin=2)
        ids, first = np.unique(data[:, 0], return_index=True)
        out = np.zeros((ids.size, x.shape[1]))
        for row, t in enumerate(ids):
            (ind,) = np.where(meta.templates == t)
            media_feats = []
            for m, count in zip(*np.unique(meta.medias[ind], return_counts=True)):
                (im,) = np.where(meta.medias[ind] == m)
                media_feats.append(x[ind][im] if count == 1 else np.mean(x[ind][im], 0, keepdims=True))
            out[row] = np.sum(np.array(media_feats), 0)
        return sklearn.preprocessing.normalize(out), list(data[first, 1])

    fpirs = [10**v for v in np.arange(-4, 0, 4 / 100)] + [1]
    probes, probe_subjects = templates_of(lists_files["probe"])
    out = {"tpir": {}, "threshold": {}, "top": {k: 0 for k in (1, 5, 10)}}
    for g in ("G1", "G2"):
        gallery, gallery_subjects = templates_of(lists_files[g])
        sims = np.dot(probes, gallery.T)
        mates, others, tops = [], [], []
        for i, subject in enumerate(probe_subjects):
            if subject in gallery_subjects:
                j = gallery_subjects.index(subject)
                rest = [sims[i, k] for k in range(len(gallery_subjects)) if k != j]
                mates.append(sims[i, j])
                others.append(max(rest))
                rank = 1 + sum(r >= sims[i, j] for r in rest)
                for k in out["top"]:
                    out["top"][k] += rank <= k
            else:
                tops.append(max(sims[i]))
        tops = sorted(tops, reverse=True)
        thresholds = [tops[max(int(len(tops) * f) - 1, 0)] for f in fpirs]
        out["threshold"][g] = thresholds
        out["tpir"][g] = [sum(m > o and m > t for m, o in zip(mates, others)) / len(mates) for t in thresholds]
    out["rank"] = {k: v / len(probe_subjects) for k, v in out["top"].items()}
    return out


@pytest.mark.parametrize("flip,normalize,detector", [(True, False, True), (False, False, True), (True, True, False)])
def test_parity_with_reference(random_set, flip, normalize, detector):
    root, feats = random_set
    meta = read_meta(root, "IJBC")
    lists = read_1n_lists(root, "IJBC", meta)
    res = evaluate_features_1n(meta, lists, feats, flip=flip, detector_score=detector, normalize_images=normalize)
    files = {k: lists.galleries[k].path for k in ("G1", "G2")} | {"probe": lists.probes.path}
    ref = reference_1n(feats, meta, files, flip, normalize, detector)
    for g in ("G1", "G2"):
        np.testing.assert_array_equal(res.galleries[g].tpir, ref["tpir"][g])
        np.testing.assert_allclose(res.galleries[g].threshold, ref["threshold"][g], rtol=1e-12)
    np.testing.assert_array_equal(res.tpir_mean, (np.array(ref["tpir"]["G1"]) + ref["tpir"]["G2"]) / 2)
    assert {k: res.rank(k) for k in (1, 5, 10)} == ref["rank"]
    assert res.mode == f"F{int(flip)} N{int(not normalize)} D{int(detector)}"
    # the set has signal and is not solved: the curves and ranks are neither 0 nor 1 throughout
    mean = res.tpir_mean
    assert 0 < mean[0] < mean[-1] <= 1 and len(set(mean.tolist())) > 3
    assert 0 < res.rank(1) < res.rank(10) < 1


def test_the_1n_templates_are_the_1to1_templates(random_set):
    """1:N reuses the 1:1 aggregation: a listed template's feature is its 1:1 template feature."""
    from arcdeploy.evaluate.ijb import aggregate_templates

    root, feats = random_set
    meta = read_meta(root, "IJBC")
    lists = read_1n_lists(root, "IJBC", meta)
    tf, _ = aggregate_templates(meta, feats)
    probe_rows = np.searchsorted(tf.ids, lists.probes.ids)
    g1_rows = np.searchsorted(tf.ids, lists.galleries["G1"].ids)
    g1 = lists.galleries["G1"]
    res = search_gallery(tf.features[probe_rows], lists.probes.subjects, tf.features[g1_rows], g1.subjects)
    full = evaluate_features_1n(meta, lists, feats)
    np.testing.assert_array_equal(res.tpir, full.galleries["G1"].tpir)


# ------------------------------------------------------------------ list files


GOOD_ROWS = [(f"{i}.jpg", t, i, 0.9) for i, t in enumerate([1, 1, 2, 3, 4, 4, 5], 1)]
GOOD_LISTS = {"G1": [(1, 11)], "G2": [(2, 22)], "probe": [(3, 11), (4, 22), (5, 33)]}


def test_lists_read(tmp_path):
    root = write_1n_set(tmp_path / "IJBC", GOOD_ROWS, GOOD_LISTS, pairs=False)
    meta = read_meta(root, "IJBC", pairs=False)
    assert meta.labels.size == 0
    lists = read_1n_lists(root, "IJBC", meta)
    np.testing.assert_array_equal(lists.probes.ids, [3, 4, 5])
    np.testing.assert_array_equal(lists.probes.subjects, [11, 22, 33])
    np.testing.assert_array_equal(lists.probes.lines, [2, 3, 5])  # template 4 has two rows
    assert lists.galleries["G1"].rows == 2 and lists.labels == {"G1": "G1", "G2": "G2"}


def test_subject_is_the_first_rows(tmp_path, caplog):
    root = write_1n_set(tmp_path / "IJBC", GOOD_ROWS, GOOD_LISTS)
    p = root / "meta" / "ijbc_1N_probe_mixed.csv"
    p.write_text("TEMPLATE_ID,SUBJECT_ID\n4,22,x\n3,11\n4,99\n\n5,33\n")
    lists = read_1n_lists(root, "IJBC")
    np.testing.assert_array_equal(lists.probes.subjects, [11, 22, 33])
    assert lists.probes.conflicting == 1 and "first row's" in caplog.text


def _list_err(root, target="IJBC", meta=True) -> str:
    with pytest.raises(ArcdeployError) as exc:
        read_1n_lists(root, target, read_meta(root, target) if meta else None)
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize(
    "file,text,expect",
    [
        ("ijbc_1N_probe_mixed.csv", "3,11\n4,22\n", "line 1: a data row where the header line should be"),
        ("ijbc_1N_probe_mixed.csv", "TEMPLATE_ID,SUBJECT_ID\n3,11\n4\n", "line 3: expected at least 2"),
        ("ijbc_1N_probe_mixed.csv", "T,S\n3,eleven\n", "line 2: subject id 'eleven' is not an integer"),
        ("ijbc_1N_gallery_G1.csv", "T,S\n1.5,11\n", "line 2: template id '1.5' is not an integer"),
        ("ijbc_1N_gallery_G2.csv", "TEMPLATE_ID,SUBJECT_ID\n", "no rows after the header line"),
        ("ijbc_1N_gallery_G2.csv", "", "no rows after the header line"),
        ("ijbc_1N_probe_mixed.csv", "T,S\n3,11\n\n42,22\n", "line 4: template 42 has no image in ijbc_face_tid"),
        (
            "ijbc_1N_gallery_G1.csv",
            "T,S\n1,11\n3,11\n",
            "line 3: subject 11 is enrolled with 2 templates (1, 3); a 1:N gallery holds one template per subject",
        ),
        ("ijbc_1N_probe_mixed.csv", 'T,S\n3,11\n"4,22\n', "not readable as CSV"),
    ],
)
def test_list_errors_name_the_file_and_line(tmp_path, file, text, expect):
    root = write_1n_set(tmp_path / "IJBC", GOOD_ROWS, GOOD_LISTS)
    p = root / "meta" / file
    p.write_text(text)
    msg = _list_err(root)
    assert msg.startswith(str(p)) and expect in msg, msg


def test_missing_list_file_and_ijbb_names(tmp_path):
    root = write_1n_set(tmp_path / "IJBC", GOOD_ROWS, GOOD_LISTS)
    (root / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    msg = _list_err(root)
    assert "ijbc_1N_gallery_G2.csv: missing IJB 1:N list file" in msg
    # IJB-B: S1 / S2 files, reported as G1 / G2 with their own names
    rootb = write_1n_set(tmp_path / "IJBB", GOOD_ROWS, GOOD_LISTS, target="IJBB")
    lists = read_1n_lists(rootb, "IJBB")
    assert lists.galleries["G1"].path.name == "ijbb_1N_gallery_S1.csv" and lists.labels["G2"] == "S2"


# ------------------------------------------------------------------ JSON and CLI


def test_json_shape(random_set, tmp_path):
    root, _ = random_set
    doc = evaluate_ijb(root, "IJBC", features=[str(root / "feats.npy")], protocol="1:N", out_dir=tmp_path, plot=False)
    assert doc["protocol"] == "1:N" and doc["target"] == "IJBC"
    assert doc["fpir"] == [float(v) for v in fpir_grid()]
    assert set(doc["tpir"]) == {"G1", "G2", "mean"} and set(doc["threshold"]) == {"G1", "G2"}
    assert all(len(v) == 101 for v in [*doc["tpir"].values(), *doc["threshold"].values()])
    assert all(0 <= v <= 1 for v in [*doc["tpir"]["G1"], *doc["tpir"]["G2"], *doc["tpir"]["mean"]])
    assert list(doc["rank"]) == ["1", "5", "10"] and all(0 <= v <= 1 for v in doc["rank"].values())
    assert doc["rank"]["1"] <= doc["rank"]["5"] <= doc["rank"]["10"]
    assert doc["cmc"]["rate"][0] == doc["rank"]["1"] and doc["cmc"]["rate"][9] == doc["rank"]["10"]
    g = doc["galleries"]["G1"]
    assert g["mated"] + g["non_mated"] == doc["probes"] and g["templates"] == 12
    json.dumps(doc, allow_nan=False)  # strict JSON: no NaN
    assert json.loads((tmp_path / "result_1n.json").read_text())["tpir"] == doc["tpir"]


def test_undefined_values_are_null_in_json(tmp_path):
    # every probe's subject is enrolled in G1: G1 has no non-mated probe, G2 no mated one
    lists = {"G1": [(1, 11), (2, 22)], "G2": [(5, 33)], "probe": [(3, 11), (4, 22)]}
    root = write_1n_set(tmp_path / "IJBC", GOOD_ROWS, lists)
    e = np.eye(4, dtype=np.float32)
    # images of templates 1, 1, 2, 3, 4, 4, 5: probe 3 is its mate's direction (a hit); probe 4 scores 0
    # against both gallery templates (a tie: a miss)
    feats = np.stack([e[0], e[0], e[1], e[0], e[2], e[2], e[3]])
    np.save(tmp_path / "f.npy", feats)
    doc = evaluate_ijb(root, "IJBC", features=[str(tmp_path / "f.npy")], protocol="1:N", out_dir=tmp_path / "o")
    assert doc["threshold"]["G1"] == [None] * 101 and doc["tpir"]["G1"] == [0.5] * 101
    assert doc["tpir"]["G2"] == [None] * 101 and doc["tpir"]["mean"] == [None] * 101
    assert doc["rank"]["1"] == 0.5 and doc["galleries"]["G2"]["mated"] == 0
    assert (tmp_path / "o" / "tpir_fpir.png").stat().st_size > 1000  # a plot without the undefined curves


def test_cli_1n_from_features(random_set, tmp_path, capsys):
    root, feats = random_set
    np.save(tmp_path / "noflip.npy", feats[:, 0])
    out, js = tmp_path / "out", tmp_path / "r.json"
    argv = ["eval", "ijb", "--root", str(root), "--protocol", "1:N", "--features", str(root / "feats.npy")]
    argv += ["--features", str(tmp_path / "noflip.npy"), "--json", str(js), "-o", str(out)]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    doc = json.loads(js.read_text())
    assert [r["mode"] for r in doc["results"]] == ["F1 N1 D1", "F0 N1 D1"]
    assert doc["tpir"] == doc["results"][0]["tpir"]
    for g in ("G1", "G2", "mean"):
        assert f"{100 * doc['shown']['tpir'][g][2]:.2f}" in printed  # TPIR at FPIR 1e-2, in percent
    assert "| feats-IJBC " in printed and "| noflip-IJBC " in printed and "rank-10" in printed
    assert f"{100 * doc['rank']['1']:.2f}" in printed
    assert (out / "tpir_fpir.png").stat().st_size > 1000 and (out / "cmc.png").stat().st_size > 1000
    # the same numbers from the library call; results are not replaced without --force
    api = evaluate_ijb(root, "IJBC", features=[str(root / "feats.npy")], protocol="1:N", out_dir=tmp_path / "o2")
    assert api["tpir"] == doc["tpir"] and api["rank"] == doc["rank"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err
    # 1:1 stays the default and shares the output folder (its own files)
    assert cli_main(["eval", "ijb", "--root", str(root), "--features", str(root / "feats.npy"), "-o", str(out)]) == 0
    assert "1:N" not in capsys.readouterr().out and (out / "result.json").exists()
    assert json.loads((out / "result.json").read_text())["protocol"] == "1:1"


def test_cli_1n_errors_are_one_line(tmp_path, capsys):
    root = write_1n_set(tmp_path / "IJBC", GOOD_ROWS, GOOD_LISTS)
    np.save(tmp_path / "f.npy", np.ones((7, 4), np.float32))
    (root / "meta" / "ijbc_1N_probe_mixed.csv").write_text("T,S\n3,11\n9,22\n")
    rc = cli_main(["eval", "ijb", "--root", str(root), "--protocol", "1:N", "--features", str(tmp_path / "f.npy")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "ijbc_1N_probe_mixed.csv: line 3: template 9 has no image" in err
    # 1:N does not need the pair file
    (root / "meta" / "ijbc_template_pair_label.txt").unlink()
    (root / "meta" / "ijbc_1N_probe_mixed.csv").write_text("T,S\n3,11\n")
    argv = ["eval", "ijb", "--root", str(root), "--protocol", "1:n", "--features", str(tmp_path / "f.npy")]
    assert cli_main([*argv, "-o", str(tmp_path / "o")]) == 0


# ------------------------------------------------------------------ package: one extraction, both protocols


@pytest.fixture(scope="module")
def demo_ijb(tmp_path_factory):
    from arcdeploy.demo.datasets import write_ijb_set

    return write_ijb_set(tmp_path_factory.mktemp("demo1n") / "IJBC", identities=6, images_per_template=2, seed=1)


def test_demo_set_has_ijb_like_1n_lists(demo_ijb):
    meta = read_meta(demo_ijb, "IJBC")
    lists = read_1n_lists(demo_ijb, "IJBC", meta)
    g1, g2 = (set(lists.galleries[g].subjects.tolist()) for g in ("G1", "G2"))
    assert len(g1) == len(g2) == 3 and not g1 & g2
    # every probe is mated in exactly one gallery, as in IJB's mixed probes
    assert all((s in g1) != (s in g2) for s in lists.probes.subjects.tolist())
    assert lists.probes.templates == 6 and lists.galleries["G1"].rows == 6


@pytest.mark.slow
def test_package_one_extraction_serves_both_protocols(demo_ijb, r18_ort_fp32_pkg, tmp_path, monkeypatch):
    import arcdeploy.evaluate.ijb.run as ijb_run

    calls = []
    real_extract = ijb_run.extract_features
    monkeypatch.setattr(ijb_run, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    docs = evaluate_protocols(
        demo_ijb, "IJBC", packages=[str(r18_ort_fp32_pkg)], out_dir=tmp_path, progress=False, plot=False
    )
    assert len(calls) == 1 and set(docs) == {"1:1", "1:N"}
    one_n = docs["1:N"]
    assert one_n["features_file"] == docs["1:1"]["features_file"] and one_n["mode"] == "F1 N1 D1"
    # the same 1:N numbers from the cached features
    again = evaluate_ijb(
        demo_ijb, "IJBC", features=[one_n["features_file"]], protocol="1:N", out_dir=tmp_path / "f", plot=False
    )
    assert again["tpir"] == one_n["tpir"] and again["rank"] == one_n["rank"]
    # what `arcdeploy run` uses: the 1:1 document with the 1:N one under "identification"
    doc = evaluate_packages([r18_ort_fp32_pkg], demo_ijb, out_dir=tmp_path, plot=False)
    assert len(calls) == 2 and doc["tar"] == docs["1:1"]["tar"]
    assert doc["identification"]["tpir"] == one_n["tpir"]


# ------------------------------------------------------------------ the trained network on real faces


@pytest.mark.slow
@needs_real("models/w600k_mbf.onnx", "faces/lfw_5pts.txt", "faces/lfw_colour_5pts.txt")
def test_w600k_on_lfw_1n_set(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import ijb_1n_from_lfw

    out = tmp_path / "r.json"
    argv = ["--real", str(REAL), "--workdir", str(tmp_path / "w"), "--people", "20", "--distractors", "20"]
    assert ijb_1n_from_lfw.main([*argv, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    one_n = doc["1:N"]
    assert one_n["galleries"]["G1"]["templates"] == 10 and one_n["probes"] == 2 * 20 + 20
    # a trained network on real faces: nearly every mate is found, and most at a strict threshold
    mated_share = 40 / 60
    assert one_n["rank"]["1"] >= 0.9 * mated_share
    assert one_n["shown"]["tpir"]["mean"][3] >= 0.8  # TPIR at FPIR 1e-1
    assert doc["1:1"]["tar"][-1] >= 0.8  # TAR at FAR 1e-1 from the same features
