"""Evaluation failing safely: results never clobbered, unusable features refused, caches checked,
any image name in IJB meta files, .bin counts and sizes as insightface reads them."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from arcdeploy.cli import main as cli_main
from arcdeploy.demo.datasets import write_bin_set, write_ijb_set
from arcdeploy.errors import ArcdeployError
from arcdeploy.evaluate.binsets import BinResult, bin_face, decode_faces, evaluate_bins, read_bin
from arcdeploy.evaluate.ijb import evaluate_features, evaluate_ijb, read_meta
from arcdeploy.evaluate.plots import plot_roc


@pytest.fixture(scope="module")
def ijb(tmp_path_factory):
    return write_ijb_set(
        tmp_path_factory.mktemp("ijb") / "IJBC",
        target="IJBC",
        identities=3,
        templates_per_id=2,
        images_per_template=2,
        seed=1,
    )


def _feats(meta, seed=0):
    return np.random.default_rng(seed).standard_normal((meta.images, 2, 16)).astype(np.float32)


# ---------------------------------------------------------------- result files


def test_result_files_and_json_need_force(ijb, tmp_path, capsys):
    meta = read_meta(ijb, "IJBC")
    np.save(tmp_path / "f.npy", _feats(meta))
    out, js = tmp_path / "out", tmp_path / "r.json"
    args = ["eval", "ijb", "--root", str(ijb), "--features", str(tmp_path / "f.npy"), "-o", str(out)]
    assert cli_main(args) == 0
    capsys.readouterr()
    before = (out / "result.json").read_bytes()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--force" in err and str(out) in err
    assert (out / "result.json").read_bytes() == before
    assert cli_main([*args, "--force"]) == 0
    js.write_text("mine")
    assert cli_main([*args, "--force", "-o", str(tmp_path / "out2"), "--json", str(js)]) == 0  # --force: replaced
    assert json.loads(js.read_text())["target"] == "IJBC"
    js.write_text("mine")
    assert cli_main([*args[:-2], "-o", str(tmp_path / "out3"), "--json", str(js)]) == 2
    assert str(js) in capsys.readouterr().err and js.read_text() == "mine"
    assert not (tmp_path / "out3" / "result.json").exists()  # refused before any work


# ---------------------------------------------------------------- unusable features


@pytest.mark.parametrize("fill", [np.nan, 0.0])
def test_no_usable_feature_is_an_error(ijb, tmp_path, capsys, fill):
    meta = read_meta(ijb, "IJBC")
    np.save(tmp_path / "f.npy", np.full((meta.images, 2, 16), fill, np.float32))
    rc = cli_main(["eval", "ijb", "--root", str(ijb), "--features", str(tmp_path / "f.npy"), "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no template has a usable feature" in err, err
    assert not (tmp_path / "o" / "result.json").exists()


def test_some_unusable_templates_are_counted_and_warned(ijb, caplog):
    meta = read_meta(ijb, "IJBC")
    feats = _feats(meta)
    dead = meta.templates == meta.templates[0]
    feats[dead] = np.nan
    with caplog.at_level(logging.WARNING, logger="arcdeploy"):
        res = evaluate_features(meta, feats, source="f.npy")
    assert res.empty_templates == 1 and res.failed_images == int(dead.sum())
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"1 of {res.templates} templates have no usable feature" in msg and f"{int(dead.sum())} of" in msg


# ---------------------------------------------------------------- the features cache


@pytest.mark.slow
def test_a_damaged_cache_is_not_trusted(ijb, r18_ort_fp32_pkg, tmp_path, caplog):
    out = tmp_path / "out"
    doc = evaluate_ijb(ijb, "IJBC", packages=[str(r18_ort_fp32_pkg)], out_dir=out, progress=False, plot=False)
    cache = Path(doc["features_file"])
    good = cache.read_bytes()
    record = json.loads(cache.with_suffix(".json").read_text())
    assert len(record["sha256"]) == 64
    header = len(good) - doc["images"] * 2 * 512 * 4
    cache.write_bytes(good[:header] + bytes(len(good) - header))  # zeroed: still a valid .npy of the right shape
    with caplog.at_level(logging.WARNING, logger="arcdeploy"):
        again = evaluate_ijb(
            ijb, "IJBC", packages=[str(r18_ort_fp32_pkg)], out_dir=out, progress=False, plot=False, force=True
        )
    assert any("do not match the checksum" in r.getMessage() for r in caplog.records)
    assert cache.read_bytes() == good and again["tar"] == doc["tar"]


@pytest.mark.slow
def test_meta_names_that_are_not_utf8(ijb, r18_ort_fp32_pkg, tmp_path):
    root = tmp_path / "IJBC"
    shutil.copytree(ijb, root)
    meta = read_meta(root, "IJBC")
    old = meta.names[1]
    new = b"img_\xe9\xff.jpg"  # not UTF-8
    os.rename(os.fsencode(root / "loose_crop" / old), os.fsencode(root / "loose_crop") + b"/" + new)
    for name in ("ijbc_face_tid_mid.txt", "ijbc_name_5pts_score.txt"):
        p = root / "meta" / name
        lines = p.read_bytes().split(b"\n")
        lines[1] = lines[1].replace(old.encode(), new, 1)
        p.write_bytes(b"\n".join(lines))
    meta = read_meta(root, "IJBC")
    assert os.fsencode(meta.names[1]) == new and meta.name_mismatches == 0
    assert meta.image_paths()[1].is_file()
    doc = evaluate_ijb(
        root, "IJBC", packages=[str(r18_ort_fp32_pkg)], out_dir=tmp_path / "o", progress=False, plot=False
    )
    assert doc["failed_images"] == 0 and doc["images"] == meta.images


def test_plot_roc_takes_plain_curves(tmp_path):
    fpr, tpr = np.array([0.0, 1e-4, 1e-2, 1.0]), np.array([0.0, 0.5, 0.9, 1.0])
    path = plot_roc([("a", fpr, tpr), ("b", fpr, tpr**2, 0.9)], tmp_path / "roc.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ArcdeployError, match="already exists"):
        plot_roc([("a", fpr, tpr)], path, force=False)


# ---------------------------------------------------------------- .bin sets


def _jpg(img):
    return cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()


@pytest.mark.parametrize("images,labels", [(87, 40), (80, 30)])
def test_bin_counts_must_match(tmp_path, images, labels):
    p = tmp_path / "x.bin"
    p.write_bytes(pickle.dumps(([b"x"] * images, [True, False] * (labels // 2)), protocol=4))
    with pytest.raises(ArcdeployError) as exc:
        read_bin(p)
    assert str(exc.value).startswith(f"{p}: {images} images for {labels} pairs")


def test_bin_images_of_other_sizes_as_insightface_reads_them():
    rng = np.random.default_rng(0)
    big = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
    np.testing.assert_array_equal(bin_face(big), cv2.resize(big, (112, 112), interpolation=cv2.INTER_CUBIC))
    same = rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)
    assert bin_face(same) is same
    for h, w in [(150, 112), (112, 150), (120, 100)]:  # never square after resize_short (or not resized at all)
        with pytest.raises(ArcdeployError, match=f"a {w}x{h} image; insightface resizes its shorter side"):
            bin_face(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    faces = decode_faces([_jpg(big), _jpg(same)])
    assert faces.shape == (2, 112, 112, 3)


@pytest.mark.slow
def test_bin_result_is_typed_and_json_needs_force(r18_ort_fp32_pkg, tmp_path, capsys):
    path = write_bin_set(tmp_path / "s.bin", pairs=10, seed=2)
    (res,) = evaluate_bins(r18_ort_fp32_pkg, [path], batch=10)
    assert isinstance(res, BinResult) and res.pairs == 10 and len(res.fold_accuracies) == 10
    assert set(res.to_json()) == {
        "name",
        "file",
        "package",
        "pairs",
        "accuracy",
        "std",
        "xnorm",
        "fold_accuracies",
        "fold_thresholds",
    }
    js = tmp_path / "r.json"
    js.write_text("mine")
    assert cli_main(["eval", "bin", str(r18_ort_fp32_pkg), str(path), "--json", str(js)]) == 2
    assert str(js) in capsys.readouterr().err and js.read_text() == "mine"
    assert cli_main(["eval", "bin", str(r18_ort_fp32_pkg), str(path), "--json", str(js), "--force"]) == 0
    assert json.loads(js.read_text())["results"][0] == json.loads(json.dumps(res.to_json()))
