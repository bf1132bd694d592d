"""A detector is a package too: SCRFD-500M built for OpenVINO / ONNX Runtime (fp32, int8), its fidelity in
a detector's terms against the source ONNX, opened wherever a detector file is taken."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import arcdeploy
from arcdeploy.cli import main
from arcdeploy.errors import ArcdeployError
from arcdeploy.faces.detectors import DetectorSpec, inspect_detector, open_detector
from arcdeploy.faces.io import decode_image, list_images
from arcdeploy.faces.types import DecodedImage
from arcdeploy.manifest import read_detector_manifest, read_package_manifest
from real_material import FACES, MODELS, needs_real

SCRFD = MODELS / "scrfd_500m_kps.onnx"
PHOTOS = FACES / "photos"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = needs_real("models/scrfd_500m_kps.onnx", "faces/photos")


def decoded(paths) -> list[DecodedImage]:
    return [DecodedImage.full(decode_image(Path(p).read_bytes(), p)) for p in paths]


@pytest.fixture(scope="module")
def fp32_packages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("detector_fp32")
    return {
        engine: arcdeploy.build(SCRFD, folder / engine, engine=engine, precision="fp32", check_images=PHOTOS)
        for engine in ("openvino", "onnxruntime")
    }


def test_batched_graph_keeps_no_unbatched_shapes(tmp_path, capfd):
    """The source records its heads' reshaped tensors as [K, C]; the batched graph gives [N, K, C],
    so those records go (ONNX Runtime warned on every load that they disagree)."""
    import onnx
    import onnxruntime as ort

    from arcdeploy.faces.detectors.graph import write_batched

    batched = tmp_path / "batched.onnx"
    write_batched(SCRFD, batched, (640, 640))
    model = onnx.load(str(batched))
    recorded = {v.name: len(v.type.tensor_type.shape.dim) for v in model.graph.value_info}
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        node = producers[out.name]
        while node.op_type != "Reshape":
            assert recorded.get(node.input[0], 3) == 3, (out.name, node.input[0])
            node = producers[node.input[0]]
    capfd.readouterr()
    sess = ort.InferenceSession(str(batched), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: np.zeros((2, 3, 640, 640), np.float32)})
    assert all(o.ndim == 3 and o.shape[0] == 2 for o in outs)
    assert "MergeShapeInfo" not in capfd.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_fp32_detector_package_finds_what_the_source_finds(fp32_packages, engine):
    pkg = fp32_packages[engine]
    m = read_detector_manifest(pkg)
    assert (m.kind, m.engine, m.precision, m.canvas, m.strides, m.anchors) == (
        "scrfd",
        engine,
        "fp32",
        (640, 640),
        (8, 16, 32),
        2,
    )
    assert m.input.dtype == "uint8" and m.input.layout == "NHWC" and m.input.normalize_in_graph
    assert m.batch_check["max_abs_diff"] < 1e-3 and len(m.graph_rewrites) >= 9
    f = m.fidelity
    assert f is not None and f.passed and f.images == 12 and f.reference_faces == f.matched == 12
    assert f.lost == f.added == 0 and f.landmark_error_max < 1e-3
    assert (pkg / m.reference).read_bytes() == SCRFD.read_bytes()
    # --detector PKG: the package's own engine, several canvases per call, the source's faces
    det = DetectorSpec(pkg, threads=1, batch=4).open()
    assert det.batch == 4 and det.takes_pixels and "detector package" in det.describe()
    assert DetectorSpec(pkg).open().batch == 1  # the measured default
    assert inspect_detector(pkg).kind == "scrfd"
    images = decoded(list_images(PHOTOS))
    ref = open_detector(SCRFD, threads=1).detect_decoded(images)
    got = det.detect_decoded(images)
    for a, b in zip(ref, got):
        assert len(a) == len(b) == 1
        np.testing.assert_allclose(b[0].points, a[0].points, atol=0.05)
    assert det.identity() != open_detector(SCRFD).identity()


@pytest.mark.slow
def test_detector_package_through_the_commands(fp32_packages, tmp_path, capsys):
    pkg = fp32_packages["onnxruntime"]
    out = tmp_path / "faces.txt"
    assert main(["detect", str(PHOTOS), "--detector", str(pkg), "-o", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 12
    # a detector package is no recognition model, and a recognition package no detector
    with pytest.raises(ArcdeployError, match="face detector package"):
        read_package_manifest(pkg)
    with pytest.raises(ArcdeployError, match="face detector package"):
        arcdeploy.load(pkg)
    assert main(["embed", str(pkg), "--images", str(PHOTOS), "-o", str(tmp_path / "f.npy")]) == 2
    assert "face detector package" in capsys.readouterr().err


@pytest.mark.slow
def test_detector_package_at_another_input_size(tmp_path, capsys):
    pkg = tmp_path / "scrfd320"
    assert (
        main(
            [
                "build",
                str(SCRFD),
                "--engine",
                "onnxruntime",
                "--precision",
                "fp32",
                "--input-size",
                "320x320",
                "--check-images",
                str(PHOTOS),
                "-o",
                str(pkg),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "320x320" in printed and "fidelity" in printed and "passed" in printed
    det = DetectorSpec(pkg).open()
    assert det.size == (320, 320)
    with pytest.raises(ArcdeployError, match="takes 320x320"):
        DetectorSpec(pkg, input_size=(640, 640)).open()


def test_what_cannot_be_built_is_refused_in_one_line(tmp_path, capsys):
    cases = [
        (["--engine", "onnxruntime", "--precision", "bf16"], "no bf16"),
        (["--precision", "int8"], "int8 needs calibration photos"),
        (["--input-size", "300x300"], "multiples of 32"),
    ]
    for extra, words in cases:
        code = main(["build", str(SCRFD), *extra, "-o", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()
    yunet = MODELS / "yunet_2023mar_int8bq.onnx"
    if yunet.exists():
        assert main(["build", str(yunet), "--check-images", str(PHOTOS), "-o", str(tmp_path / "y")]) == 2
        assert "only SCRFD builds" in capsys.readouterr().err
    recognition = MODELS / "w600k_mbf.onnx"
    if recognition.exists():
        assert main(["build", str(recognition), "--input-size", "640x640", "-o", str(tmp_path / "z")]) == 2
        assert "--input-size applies to a face detector" in capsys.readouterr().err
    with pytest.raises(ArcdeployError, match="not a detector file or a detector package"):
        DetectorSpec(tmp_path).open()


@pytest.mark.slow
@needs_real("models/scrfd_500m_kps.onnx", "faces/photos", "faces/lfw_colour")
def test_int8_detector_package_fidelity_is_checked_and_recorded(tmp_path, monkeypatch):
    """int8 (the recognition recipe: wide-spread and depthwise layers in float, each canvas's own
    ranges; full bias correction; the stem quantized on the pixels' grid) calibrated on LFW photos
    and group photos tiled from other LFW people, checked on the real photos and a group photo:
    faces of a useful size keep to the floor; the small faces of the group photo (16 canvas px
    between the eyes) are measured and recorded apart. The recipe's package misses the floor there
    (int8 moves their points by a few tenths of a detector pixel: 1.4% of their IOD, mean), so the
    fallback keeps its most sensitive layers in float until the calibration's group photos meet it
    (4 layers on an AVX-512 EPYC, validation mean 1.2% -> 0.8%; 6 when 40 LFW photos were
    calibrated on), searching the ranking by gain and in other orders that weigh each layer's
    float cost, and records them."""
    sys.path.insert(0, str(BENCHMARKS))
    from _photo_sets import group_photo
    from arcdeploy import detector_fallback

    monkeypatch.setattr(detector_fallback, "SPEED_SECONDS", 0.3)  # the speed cost's rounds, shorter than a user's
    # fewer validation photos than a user's build (the crowded ones come first: the group photos are kept)
    monkeypatch.setattr(detector_fallback, "VALIDATION_PHOTOS", 8)
    monkeypatch.setattr(detector_fallback, "RANKING_PHOTOS", 4)
    real = FACES.parent
    # 20 LFW photos (a user's build takes more): the statistics and the fallback's second quantization
    # cost in proportion, and the small faces still miss the floor before the fallback
    lfw = sorted((FACES / "lfw_colour").rglob("*.jpg"))[::9][:20]
    groups = [group_photo(real, tmp_path / f"calib_group_{s}.jpg", seed=s, start=100 * s) for s in (1, 2)]
    checks = [*list_images(PHOTOS), group_photo(real, tmp_path / "group.jpg")]
    pkg = arcdeploy.build(
        SCRFD,
        tmp_path / "int8",
        engine="openvino",
        precision="int8",
        calib=[*lfw, *groups, *checks],
        calib_count=len(lfw) + len(groups),
    )
    m = read_detector_manifest(pkg)
    assert m.precision == "int8" and m.calibration["canvases"] == len(lfw) + len(groups)
    # OpenVINO quantizes the stem too, its input quantizer on the canvas pixels' own grid
    assert m.calibration["recipe"]["pixel_input"] and "stem" not in m.calibration["recipe"]["keep_float"]
    if "Conv_0/WithoutBiases" not in (m.calibration.get("fallback") or {}).get("kept_float", []):
        import openvino as ov

        grid = [
            op
            for op in ov.Core().read_model(str(pkg / "model.xml")).get_ordered_ops()
            if op.get_type_name() == "FakeQuantize"
            and np.allclose(op.input_value(1).get_node().get_data(), -127.5 / 128, rtol=0, atol=1e-7)
            and np.allclose(op.input_value(2).get_node().get_data(), 127.5 / 128, rtol=0, atol=1e-7)
        ]
        assert len(grid) == 1 and grid[0].get_levels() == 256
    assert m.calibration["recipe"]["range_estimator"] == "max_quantile"
    assert m.calibration["recipe"]["bias_correction"] == "full" and "fast" not in m.calibration["method"]
    assert "depthwise" in m.calibration["kept_float_why"]
    assert any(v.get("u8", 0) + v.get("i8", 0) for v in m.executed["layers"].values())
    f = m.fidelity
    assert f.images == 13 and f.reference_faces >= 100
    large, small = f.by_size["large"], f.by_size["small"]
    assert large["faces"] >= 12 and small["faces"] >= 80
    assert large["min_iou"] >= 0.95 and large["landmark_error_mean"] <= 0.01 and large["landmark_error_max"] <= 0.03
    assert small["min_iou"] >= 0.9 and small["landmark_error_mean"] <= 0.025
    # the verdict follows the recorded figures and the floor (its max judged on faces of a useful size)
    fails = (
        f.lost > 0
        or f.added > 0
        or f.min_iou < f.floor["iou"]
        or f.landmark_error_mean > f.floor["landmark_error_mean"]
        or large["landmark_error_max"] > f.floor["landmark_error_max"]
    )
    assert f.passed is (not fails) and bool(f.below_floor) is fails
    assert f.lost <= 1 and f.added <= 1  # of 169 faces, the faintest one at most (none on this CPU)
    saved = json.loads((pkg / "manifest.json").read_text())["fidelity"]
    assert saved["by_size"]["small_iod_canvas_px"] == 16.0
    # the fallback: validated on calibration photos (the group photos among them), never the check photos
    fb = m.calibration.get("fallback")
    assert fb is not None, "the recipe's package passed on this CPU: nothing to fall back from"
    assert fb["validation_photos"] <= len(lfw) + len(groups) and fb["validation_faces"] >= 100
    kept, target = fb["kept_float"], fb["validation_target"]
    assert 1 <= len(kept) <= fb["candidates"] and set(kept) <= set(m.calibration["kept_float"])
    before, after = fb["validation_before"], fb["validation_after"]
    assert after["landmark_error_mean"] < before["landmark_error_mean"]
    if not fb.get("no_int8_left"):  # int8 is left, and the validation photos meet the floor with its margin
        assert after["landmark_error_mean"] <= target.get("landmark_error_mean", float("inf"))
        assert after["landmark_error_max_judged"] <= target.get("landmark_error_max", float("inf"))
        assert target  # something the check missed is asked of the validation photos
        assert after["lost"] == 0 and after["added"] == 0
        assert any(v.get("u8", 0) + v.get("i8", 0) for v in m.executed["layers"].values())
    assert fb["ranking"][0]["gain"] > 0
    # searched along other orders too (by gain with the dear layers last, by gain per ms of float: OpenVINO
    # times each layer); of the passing sets the fastest is kept
    orders, ms = fb["orders"], {r["layer"]: r["float_ms"] for r in fb["ranking"] if "float_ms" in r}
    tried = {k: v for k, v in orders.items() if k not in ("kept", "how")}
    assert "by gain" in tried and orders["kept"] in tried and ms and all(v >= 0 for v in ms.values())
    chosen = tried[orders["kept"]]
    assert chosen["layers"] == len(kept) and (chosen["passed"] or not any(v["passed"] for v in tried.values()))
    if "canvases_per_s" in chosen:  # several passing sets: timed in turns, the fastest kept
        assert all(chosen["canvases_per_s"] >= v.get("canvases_per_s", 0) for v in tried.values())
    else:
        assert all(chosen["float_ms"] <= v["float_ms"] for v in tried.values() if v["passed"])
    if orders["kept"] == "by gain":
        assert fb["ranking"][0]["layer"] == kept[0]
    assert fb["speed"]["recipe_canvases_per_s"] > 0 and fb["speed"]["fallback_vs_recipe"] > 0
    assert fb["speed"]["threads"] == 1 and fb["speed"]["batch"] == 1  # as the photo pipeline calls it
    # what the fallback bought on the check photos' small faces: under the floor's mean (1.4% without)
    assert small["landmark_error_mean"] <= f.floor["landmark_error_mean"]


@pytest.mark.slow
def test_detector_package_travels_to_ray_workers(fp32_packages, tmp_path):
    """What a Ray actor gets: the package's files under its folder's name, opened there."""
    pytest.importorskip("ray")
    from arcdeploy.faces.detectors.package import detector_files

    pkg = fp32_packages["openvino"]
    files = detector_files(pkg)
    assert f"{pkg.name}/manifest.json" in files and all(p.is_file() for p in files.values())
    assert detector_files(SCRFD) == {SCRFD.name: SCRFD}
    for name, path in files.items():  # as PackageBundle.unpack places the extras
        target = tmp_path / "extras" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    moved = DetectorSpec(pkg, threads=1).with_path(tmp_path / "extras" / pkg.name).open()
    here = DetectorSpec(pkg, threads=1).open()
    images = decoded(list_images(PHOTOS)[:3])
    for a, b in zip(here.detect_decoded(images), moved.detect_decoded(images)):
        assert np.array_equal(a[0].points, b[0].points)


def test_faces_pair_by_box_iou_best_first():
    """Hand-checkable pairing: the best pairs first, each face in one pair at most, IoU 0.5 still
    a pair, a face with no partner left out."""
    from types import SimpleNamespace

    from arcdeploy.detector_check import _pair_faces

    def faces(*boxes):
        return [SimpleNamespace(box=np.array(b, np.float32)) for b in boxes]

    ref = faces([0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10])
    got = faces([1, 0, 11, 10], [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 5], [70, 70, 80, 80])
    used_r, used_g, pairs = _pair_faces(ref, got)
    assert [(i, j) for _, i, j in pairs] == [(1, 2), (0, 1), (2, 3)]  # ties: as sorted(reverse=True)
    assert [round(iou, 6) for iou, _, _ in pairs] == [1.0, 1.0, 0.5]
    assert used_r == {0, 1, 2} and used_g == {1, 2, 3}  # got[0] (IoU 0.82 with ref[0], taken) and got[4]: none
    assert _pair_faces([], got) == (set(), set(), []) and _pair_faces(ref, []) == (set(), set(), [])
