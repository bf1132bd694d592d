"""Real networks, real faces: every engine and precision meets its floor on held-out real faces,
LFW-600 accuracy is the reference's, int8 stays within 0.2 pt, and the photos of one person
score above every pair of different people.

Uses ../shared/real (a realistically trained arcface_torch mbf, 800 LFW faces with landmarks,
insightface's lfw_600.bin, 12 photos of 8 people); skipped with a reason when it is absent.
Calibration takes the first 50 LFW identities, the fidelity checks the other 50 (people the
calibration never saw); the packages are built once per session (``real_packages`` in conftest.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from arcdeploy import compare, load
from conftest import REAL_CALIB_COUNT
from real_material import REAL, needs_real

CKPT = REAL / "models" / "mbf_w600k_gdc.pth"
LFW = REAL / "faces" / "lfw"
LFW_5PTS = REAL / "faces" / "lfw_5pts.txt"
LFW_BIN = REAL / "bins" / "lfw_600.bin"
PHOTOS = REAL / "faces" / "photos"
PHOTOS_5PTS = REAL / "faces" / "photos_5pts.txt"
# the accuracy the data's README gives for this checkpoint in fp32 (insightface protocol: flip, 10 folds)
LFW600_REFERENCE = 0.9917

pytestmark = [pytest.mark.slow, needs_real("models/mbf_w600k_gdc.pth", "faces/lfw_5pts.txt", "bins/lfw_600.bin")]

COMBOS = [
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
]


@pytest.mark.parametrize("engine,precision", COMBOS)
def test_floor_on_held_out_real_faces(real_packages, engine, precision):
    m = load(real_packages(engine, precision)).manifest
    fid = m.fidelity.to_json()
    assert fid["images_source"].endswith("held_out.txt") and fid["cosine"]["n"] == 160
    assert fid["passed"], (engine, precision, fid["cosine"], fid["below_floor"])
    if precision == "int8":
        assert m.calibration.count == REAL_CALIB_COUNT and "5-point similarity alignment" in m.calibration.preprocessing
        # the recipe itself keeps the layer whose input channels spread far apart (no fallback needed)
        spread = m.calibration.input_channel_spread
        assert len(spread) >= 1 and all(v > m.calibration.recipe["spread_threshold"] for v in spread.values())
        assert "fallback" not in m.calibration.to_json()


@pytest.fixture(scope="module")
def lfw600_fp32(real_packages):
    """The OpenVINO fp32 package's LFW-600 result, evaluated once for the module."""
    from arcdeploy.evaluate.binsets import evaluate_bins

    return evaluate_bins(real_packages("openvino", "fp32"), [LFW_BIN])[0]


def test_lfw600_accuracy_fp32(lfw600_fp32):
    assert lfw600_fp32.pairs == 600
    assert round(lfw600_fp32.accuracy, 4) == LFW600_REFERENCE


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_lfw600_accuracy_int8(real_packages, lfw600_fp32, engine):
    from arcdeploy.evaluate.binsets import evaluate_bins

    (res,) = evaluate_bins(real_packages(engine, "int8"), [LFW_BIN])
    assert res.pairs == 600
    assert res.accuracy >= lfw600_fp32.accuracy - 0.002, (res.accuracy, lfw600_fp32.accuracy)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_photos_same_person_above_every_other_pair(real_packages, precision):
    from arcdeploy.faces.io import list_images

    pkg = load(real_packages("openvino", precision))
    paths = list_images(PHOTOS)
    feats = pkg.embed(paths, landmarks=PHOTOS_5PTS)
    people = [p.parent.name for p in paths]
    same, diff = [], []
    for i, j in itertools.combinations(range(len(paths)), 2):
        (same if people[i] == people[j] else diff).append(float(feats[i] @ feats[j]))
    assert same and diff
    assert min(same) > max(diff), (min(same), max(diff))
    # the one-pair helper agrees with the rows
    assert compare(feats[0], feats[1]) == pytest.approx(float(feats[0] @ feats[1]), abs=1e-5)


def test_int8_really_runs_int8(real_packages):
    """Every convolution the recipe does not keep in float runs in u8/i8; those it keeps are the stem
    and the depthwise ones (3.5% of the MACs)."""
    m = load(real_packages("openvino", "int8")).manifest
    layers = m.executed.layers
    counts = [(k, v) for kind in ("Convolution", "GroupConvolution") for k, v in layers.get(kind, {}).items()]
    low = sum(v for k, v in counts if k in ("u8", "i8"))
    kept = [n for n in m.calibration.kept_float if "Conv" in n]
    assert low == sum(v for _, v in counts) - len(kept) and low >= 30, (layers, kept)
    assert set(m.calibration.kept_float_why) >= {"stem", "depthwise", "head"}
    assert np.isfinite(m.fidelity.cosine.min)
