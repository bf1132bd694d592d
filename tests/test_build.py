"""Issue 3: build packages (engine x precision), calibration, manifest, fidelity floors, errors."""

from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from arcdeploy import build
from arcdeploy.cli import main as cli_main
from arcdeploy.errors import ArcdeployError
from arcdeploy.fidelity import FLOORS
from arcdeploy.machine import BF16_FLAGS, FP16_FLAGS, cpu_flags
from arcdeploy.manifest import PACKAGE_FORMAT
from arcdeploy.package import load, read_manifest
from arcdeploy.synthetic import draw_face
from arcdeploy.types import Precision
from conftest import R18_CALIB_COUNT, R18_CHECK_COUNT, untrained_int8_recipe

pytestmark = pytest.mark.slow  # builds packages of every engine and precision

CALIB_COUNT = R18_CALIB_COUNT
CHECK_COUNT = R18_CHECK_COUNT


@pytest.fixture(scope="module")
def calib_faces(r18_calib_faces) -> np.ndarray:
    return r18_calib_faces


@pytest.fixture(scope="module")
def packages(r18_packages):
    """Packages built once per (engine, precision), on demand (shared with other modules: conftest.py)."""
    return r18_packages


RUNNABLE = [
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("openvino", "fp16"),
    ("openvino", "int8"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("torch", "fp32"),
]


@pytest.mark.parametrize("engine,precision", RUNNABLE)
def test_build_passes_its_fidelity_floor(packages, faces16, engine, precision):
    pkg_dir = packages(engine, precision)
    m = read_manifest(pkg_dir)
    assert m["format"] == PACKAGE_FORMAT and m["engine"] == engine and m["precision"] == precision
    fid = m["fidelity"]
    assert fid["floor"] == FLOORS[precision]
    for k, v in FLOORS[precision].items():
        assert fid["cosine"][k] >= v, (engine, precision, fid["cosine"])
    assert fid["passed"] is True
    assert fid["reference"].startswith("pytorch fp32")
    # the package runs on its own and its output agrees with the recorded check
    pkg = load(pkg_dir)
    out = pkg.infer(faces16)
    assert out.shape == (16, 512) and out.dtype == np.float32 and np.all(np.isfinite(out))
    assert pkg.describe().engine == engine


def test_int8_calibration_recorded(packages, calib_faces):
    for engine in ("openvino", "onnxruntime"):
        m = read_manifest(packages(engine, "int8"))
        cal = m["calibration"]
        assert cal["count"] == CALIB_COUNT and cal["source"] == "array"
        assert cal["kept_float"], "the fc head is kept in float and recorded"
        assert m["fidelity"]["images"].startswith("held-out calibration images")
        assert m["fidelity"]["cosine"]["n"] == len(calib_faces) - CALIB_COUNT
    # the OpenVINO int8 model really executes int8 convolutions, all but those the recipe keeps in float,
    # and those run in the precision the recipe asks for (f32 by default, on any CPU)
    m = read_manifest(packages("openvino", "int8"))
    ex, cal = m["executed"], m["calibration"]
    conv = ex["layers"]["Convolution"]
    kept_convs = sum(1 for name in cal["kept_float"] if "Conv" in name and "Gemm" not in name)
    float_precision = cal["recipe"]["float_precision"]
    assert kept_convs >= 1  # the stem
    assert conv.get(float_precision, 0) == kept_convs
    assert conv.get("u8", 0) + conv.get("i8", 0) == 21 - kept_convs  # r18: 21 convolutions
    assert ex["layers"]["FullyConnected"] == {float_precision: 1}
    assert ex["inference_precision"] == float_precision


def test_low_precision_hint_reports_what_executes(packages):
    for precision in ("bf16", "fp16"):
        pkg = load(packages("openvino", precision))
        d = pkg.describe()
        executed = pkg.manifest.executed.to_json()
        recorded = executed["inference_precision"]
        assert d.details["executed"]["inference_precision"] == recorded == d.executes
        hint = {"bf16": "bf16", "fp16": "f16"}[precision]
        assert d.details["requested_precision_hint"] == hint
        native = {"bf16": BF16_FLAGS, "fp16": FP16_FLAGS}[precision]
        if cpu_flags() & native:
            assert recorded == hint
        else:  # no native support: the plugin runs something else, and the manifest says so
            assert recorded != hint and recorded in ("f32", "bf16") and "note" in executed


def test_manifest_contents(packages):
    pkg_dir = packages("openvino", "fp32")
    m = read_manifest(pkg_dir)
    assert m["arch"] == "r18" and m["device"] == "CPU"
    assert m["input"]["layout"] == "NCHW" and m["input"]["dtype"] == "float32"
    assert m["input"]["normalize"] == {"mean": 127.5, "std": 127.5} and m["input"]["normalize_in_graph"] is False
    assert m["dynamic_batch"] is True and m["batch"] is None and m["calibration"] is None
    assert len(m["source"]["sha256"]) == 64
    assert {"openvino", "torch", "onnxruntime", "nncf"} <= set(m["versions"])
    assert (pkg_dir / m["files"]["model"]).exists() and (pkg_dir / "model.bin").exists()
    ref = pkg_dir / m["reference"]["file"]
    assert ref.exists() and m["reference"]["precision"] == "fp32"
    assert {"mean", "min", "p1", "max", "n"} <= set(m["fidelity"]["cosine"])
    assert m["fidelity"]["images"] == "generated"


def test_build_from_checkpoint_folded_static_batch(tmp_path, r18_ckpt, faces16):
    """Checkpoint in (export implied), uint8 NHWC input folded into the graph, static batch 4."""
    out = build(
        r18_ckpt,
        tmp_path / "pkg",
        engine="openvino",
        precision="fp32",
        batch=4,
        fold_preprocessing=True,
        check_count=CHECK_COUNT,
    )
    m = read_manifest(out)
    assert m["input"]["dtype"] == "uint8" and m["input"]["layout"] == "NHWC" and m["input"]["normalize_in_graph"]
    assert m["batch"] == 4 and m["dynamic_batch"] is False
    assert m["fidelity"]["passed"] and m["fidelity"]["cosine"]["min"] >= FLOORS["fp32"]["min"]
    pkg = load(out)
    six = pkg.infer(faces16[:6])  # padded to two batches of 4
    assert six.shape == (6, 512)
    np.testing.assert_allclose(six[:4], pkg.infer(faces16[:4]), rtol=1e-5, atol=1e-5)


def test_onnxruntime_folded_preprocessing(tmp_path, r18_export, faces16, packages):
    out = build(
        r18_export.out_dir,
        tmp_path / "pkg",
        engine="onnxruntime",
        precision="fp32",
        fold_preprocessing=True,
        check_count=CHECK_COUNT,
    )
    folded = load(out)
    assert folded.runtime.session.get_inputs()[0].type == "tensor(uint8)"
    plain = load(packages("onnxruntime", "fp32"))
    np.testing.assert_allclose(folded.infer(faces16), plain.infer(faces16), rtol=1e-4, atol=1e-4)


def test_openvino_infer_many_matches_infer(packages, faces16):
    pkg = load(packages("openvino", "int8"), performance_hint="THROUGHPUT")
    assert pkg.describe().details["performance_hint"] == "THROUGHPUT"
    batches = [faces16[i : i + 4] for i in range(0, 16, 4)]
    many = pkg.infer_many(batches)
    assert len(many) == 4
    for got, b in zip(many, batches):
        np.testing.assert_allclose(got, pkg.infer(b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_load_and_infer_without_torch(packages, engine):
    pkg_dir = packages(engine, "int8" if engine == "openvino" else "fp32")
    code = (
        "import sys, numpy as np, arcdeploy\n"
        f"pkg = arcdeploy.load({str(pkg_dir)!r})\n"
        "out = pkg.infer(np.full((2, 112, 112, 3), 128, np.uint8))\n"
        "assert out.shape == (2, 512), out.shape\n"
        "pkg.describe()\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_precision_aliases(tmp_path, r18_export):
    assert Precision.parse("force_float32") == "fp32"
    assert Precision.parse("force_float16") == "fp16"
    assert Precision.parse("qint8_mixed_float16") == "int8"
    out = tmp_path / "pkg"
    assert (
        cli_main(
            [
                "build",
                str(r18_export.onnx_path),
                "--engine",
                "onnxruntime",
                "--precision",
                "force_float32",
                "--check-count",
                "8",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    m = read_manifest(out)
    assert m["precision"] == "fp32" and m["requested_precision"] == "force_float32"


def test_int8_alias_builds_with_calibration_files(tmp_path, r18_export):
    """qint8_mixed_float16 on photos + a landmark file: calibrated on aligned crops, rest held out."""
    img_dir = tmp_path / "photos"
    img_dir.mkdir()
    rows = []
    for i in range(24):
        img, lmk = draw_face(identity=i % 12, variation=i, size=160)
        name = f"p{i:02d}.png"
        cv2.imwrite(str(img_dir / name), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append(name + " " + " ".join(f"{v:.2f}" for v in lmk.ravel()))
    (img_dir / "broken.jpg").write_bytes(b"not a jpeg")
    lmk_file = tmp_path / "lmk.txt"
    lmk_file.write_text("\n".join(rows) + "\n")
    out = build(
        r18_export.out_dir,
        tmp_path / "pkg",
        engine="onnxruntime",
        precision="qint8_mixed_float16",
        calib=img_dir,
        calib_landmarks=lmk_file,
        calib_count=16,
        recipe=untrained_int8_recipe(16),
    )
    m = read_manifest(out)
    assert m["precision"] == "int8"
    assert m["calibration"]["count"] == 16 and m["calibration"]["skipped_count"] == 1
    assert "broken.jpg" in m["calibration"]["skipped"][0]
    assert "alignment" in m["calibration"]["preprocessing"]
    assert m["fidelity"]["cosine"]["n"] == 8  # 24 readable - 16 used


def test_strict_fails_and_writes_nothing(tmp_path, r18_export):
    """Calibrating on flat grey images gives useless activation ranges: below the
    floor, --strict refuses to write the package; without it, a warning."""
    flat = np.full((16, 112, 112, 3), 128, np.uint8)  # 16: fewer calibration faces are refused outright
    out = tmp_path / "pkg"
    with pytest.raises(ArcdeployError, match="below the floor.*not written"):
        build(
            r18_export.out_dir,
            out,
            engine="openvino",
            precision="int8",
            calib=flat,
            strict=True,
            check_count=CHECK_COUNT,
            fallback=False,  # --strict on the recipe's own verdict (the fallback has its own test)
        )
    assert not out.exists()


def _cli_error(argv, capsys) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_one_line(tmp_path, r18_export, capsys, monkeypatch):
    src = str(r18_export.out_dir)
    out = str(tmp_path / "pkg")
    err = _cli_error(["build", src, "--engine", "openvino", "--precision", "int8", "-o", out], capsys)
    assert "calibration" in err and "--calib" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _cli_error(["build", src, "--precision", "int8", "--calib", str(empty), "-o", out], capsys)
    assert "no images" in err and str(empty) in err
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"x{i}.jpg").write_bytes(b"garbage")
    err = _cli_error(["build", src, "--precision", "int8", "--calib", str(bad), "-o", out], capsys)
    assert "no usable calibration images" in err and "x0.jpg" in err
    err = _cli_error(["build", src, "--engine", "torch", "--precision", "int8", "--calib", str(bad), "-o", out], capsys)
    assert "no int8 build" in err
    err = _cli_error(["build", src, "--engine", "onnxruntime", "--precision", "fp16", "-o", out], capsys)
    assert "needs a GPU" in err and "openvino" in err
    err = _cli_error(["build", src, "--engine", "torch", "--precision", "bf16", "-o", out], capsys)
    assert "CUDA" in err
    with pytest.raises(ArcdeployError, match="unknown precision"):
        build(src, out, engine="openvino", precision="int4")
    with pytest.raises(ArcdeployError, match="unknown engine"):
        build(src, out, engine="tensorrt", precision="fp32")
    with pytest.raises(ArcdeployError, match=r"calibration images array: expected aligned uint8"):
        build(src, out, engine="openvino", precision="int8", calib=np.zeros((4, 64, 64, 3), np.uint8))
    from arcdeploy.engines import registry

    monkeypatch.setitem(
        registry.ENGINE_MODULES, "openvino", ("arcdeploy.engines.openvino", "openvino_not_installed_here", "openvino")
    )
    err = _cli_error(["build", src, "--engine", "openvino", "-o", out], capsys)
    assert "not installed: pip install openvino" in err
    assert not (tmp_path / "pkg").exists()  # no failed build leaves a package behind


def test_existing_output_needs_force(tmp_path, r18_export, capsys):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    err = _cli_error(["build", str(r18_export.out_dir), "--engine", "onnxruntime", "-o", str(out)], capsys)
    assert "already exists" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "user data"


class _SmallResNet(torch.nn.Module):
    """Four convolutions, two residual Adds, PReLU and a 512-d head, with a few wide channels after each
    BatchNorm (6x the others': under the recipe's 10x spread rule), so that per-tensor activation ranges
    cost the narrow channels some precision: an int8 build misses a 0.999 floor by a little, and the
    fallback has few candidates to rank (one compile and run each), unlike an r18's 40."""

    def __init__(self):
        super().__init__()
        nn = torch.nn

        def conv(cin, cout, stride=1, act=True):
            layers = [nn.Conv2d(cin, cout, 3, stride, 1), nn.BatchNorm2d(cout)]
            return layers + [nn.PReLU(cout)] if act else layers

        torch.manual_seed(0)
        self.stem = nn.Sequential(*conv(3, 16, 2))
        self.a = nn.Sequential(*conv(16, 16), *conv(16, 16, act=False))
        self.down = nn.Sequential(*conv(16, 32, 2))
        self.b = nn.Sequential(*conv(32, 32), *conv(32, 32, act=False))
        self.pool = nn.AdaptiveAvgPool2d(7)
        self.fc = nn.Linear(32 * 49, 512)
        for bn in (m for m in self.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
            bn.weight.data[::4] *= 6.0

    def forward(self, x):
        x = self.stem(x)
        x = x + self.a(x)
        x = self.down(x)
        x = x + self.b(x)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
    from arcdeploy import export

    folder = tmp_path_factory.mktemp("small")
    with torch.no_grad():
        torch.onnx.export(
            _SmallResNet().eval(),
            (torch.rand(1, 3, 112, 112),),
            str(folder / "small.onnx"),
            dynamo=False,
            opset_version=17,
            input_names=["data"],
            output_names=["fc1"],
            dynamic_axes={"data": {0: "batch"}, "fc1": {0: "batch"}},
        )
    return export(folder / "small.onnx", folder / "export")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.parametrize("engine", ["openvino", "onnxruntime"])
def test_int8_fallback_keeps_the_most_sensitive_layers_float(tmp_path, small_export, calib_faces, engine, monkeypatch):
    """A floor above what the recipe reaches (--max-cosine-drop 0.001): the fallback ranks the quantized
    layers (convolutions and residual Adds), puts the most sensitive back in float, requantizes, and
    records what it did."""
    from arcdeploy import fallback

    monkeypatch.setattr(fallback, "SPEED_SECONDS", 0.3)  # the speed cost's rounds, shorter than a user's
    common = {
        "engine": engine,
        "precision": "int8",
        "calib": calib_faces,
        "calib_count": CALIB_COUNT,
        "check_count": CHECK_COUNT,
        "max_cosine_drop": 0.001,
        "recipe": untrained_int8_recipe(CALIB_COUNT),
    }
    out = build(small_export.out_dir, tmp_path / "pkg", **common)
    m = read_manifest(out)
    fb = m["calibration"]["fallback"]
    assert m["fidelity"]["floor"]["mean"] == pytest.approx(0.999)
    assert fb["kept_float"] and fb["candidates"] >= len(fb["kept_float"])
    assert any("Add" in r["layer"] for r in fb["ranking"])  # residual Adds are candidates too
    ranked = [r["layer"] for r in fb["ranking"]]
    assert ranked[: len(fb["kept_float"])] == fb["kept_float"]  # the most sensitive first
    assert set(fb["kept_float"]) <= set(m["calibration"]["kept_float"])  # and really kept in float
    assert fb["validation_after"]["mean"] > fb["validation_before"]["mean"]
    assert str(len(fb["kept_float"])) in fb["prefixes_tried"]
    speed = fb["speed"]  # what the float layers cost: both packages timed at build time
    assert speed["recipe_images_per_s"] > 0 and speed["fallback_images_per_s"] > 0 and speed["fallback_vs_recipe"] > 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # the recipe's files are gone
    # the same build without the fallback
    before = read_manifest(plain := build(small_export.out_dir, tmp_path / "plain", fallback=False, **common))
    assert "fallback" not in before["calibration"] and plain.exists()
    assert m["fidelity"]["cosine"]["mean"] > before["fidelity"]["cosine"]["mean"]


def test_fallback_cli_options(tmp_path, r18_export, capsys):
    err = _cli_error(
        [
            "build",
            str(r18_export.out_dir),
            "--precision",
            "int8",
            "--max-cosine-drop",
            "2",
            "--calib",
            str(tmp_path),
            "-o",
            str(tmp_path / "p"),
        ],
        capsys,
    )
    assert "--max-cosine-drop must be between 0 and 1" in err


def test_input_spreads_are_the_float_models_channel_ranges(mbf_export):
    """The recipe's "spread" measure (every convolution input's per-channel range), reduced inside
    the OpenVINO graph: the first convolution reads the input itself, so its spread is numpy's on
    the input; every other one is what ONNX Runtime measures on the same export (tensors fetched,
    reduced in numpy)."""
    from arcdeploy.engines import onnxruntime as ort_engine
    from arcdeploy.engines import openvino as ov_engine
    from arcdeploy.quantize import range_spread

    x = np.random.default_rng(5).normal(0, 1, (20, 3, 112, 112)).astype(np.float32)
    x[:, 1] *= 3.0  # channels of unlike ranges: a spread far from 1
    model = ov_engine.convert(mbf_export.onnx_path)
    ov = ov_engine.input_spreads(model, x, batch=8)  # batches of 8, 8 and 4: ranges merged across them
    first = next(op for op in ov_engine.weighted_ops(model) if op.get_type_name() != "MatMul")
    want = range_spread(x.max(axis=(0, 2, 3)) - x.min(axis=(0, 2, 3)))
    assert ov[first.get_friendly_name()] == pytest.approx(want, rel=1e-6) and want > 1.5
    ort = ort_engine.input_spreads(mbf_export.onnx_path, x, model.inputs[0].get_any_name())
    assert len(ov) == len(ort) >= 10
    np.testing.assert_allclose(sorted(ov.values()), sorted(ort.values()), rtol=1e-3)


def test_narrow_group_convolutions_are_regrouped_with_the_same_outputs():
    """OpenVINO: a grouped convolution of 2 channels per group is rewritten as groups of 8 (block-diagonal
    weights); depthwise ones, groups that do not tile 8 channels and wide groups are left alone."""
    import openvino as ov
    from openvino import opset13

    from arcdeploy.engines.openvino import regroup_narrow_group_convolutions

    rng = np.random.default_rng(0)
    x = opset13.parameter([2, 16, 9, 9], np.float32)

    def gconv(inp, groups, per, stride=1):
        w = rng.standard_normal((groups, per, per, 3, 3)).astype(np.float32)
        return opset13.group_convolution(inp, opset13.constant(w), [stride, stride], [1, 1], [1, 1], [1, 1])

    narrow = gconv(x, 8, 2, stride=2)  # rewritten
    depthwise = gconv(narrow, 16, 1)  # left: depthwise
    wide = gconv(depthwise, 1, 16)  # left: already one group of 16
    odd = gconv(opset13.parameter([2, 12, 5, 5], np.float32), 3, 4)  # left: 12 channels do not tile 8
    x2 = odd.input_value(0).get_node()
    model = ov.Model([wide, odd], [x, x2])
    data = [
        rng.standard_normal((2, 16, 9, 9)).astype(np.float32),
        rng.standard_normal((2, 12, 5, 5)).astype(np.float32),
    ]
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    before = [o.copy() for o in ov.Core().compile_model(model, "CPU", config)(data).values()]
    done = regroup_narrow_group_convolutions(model)
    assert len(done) == 1 and "8 groups of 2 channels -> 2 groups of 8" in done[0], done
    shapes = [
        list(op.input_value(1).get_shape())
        for op in model.get_ordered_ops()
        if op.get_type_name() == "GroupConvolution"
    ]
    assert sorted(shapes) == [[1, 16, 16, 3, 3], [2, 8, 8, 3, 3], [3, 4, 4, 3, 3], [16, 1, 1, 3, 3]]
    after = list(ov.Core().compile_model(model, "CPU", config)(data).values())
    for a, b in zip(before, after):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mean, std", [(127.5, 128.0), (127.5, 127.5), ((120.0, 127.5, 130.0), (60.0, 64.0, 70.0))])
def test_the_input_quantizer_on_the_pixel_grid_gives_back_every_pixel_value_exactly(mean, std):
    """A FakeQuantize on normalised pixels with a calibration range (levels between the pixels')
    moved onto the pixels' own grid: all 256 values of each channel come out as they went in."""
    import openvino as ov
    from openvino import opset13

    from arcdeploy.engines.openvino import input_quantizers_on_pixel_grid
    from arcdeploy.manifest import InputSpec

    x = opset13.parameter([1, 3, 16, 16], np.float32)
    lo, hi = opset13.constant(np.float32(-0.97)), opset13.constant(np.float32(0.93))  # as NNCF might find
    model = ov.Model([opset13.fake_quantize(x, lo, hi, lo, hi, 256)], [x])
    spec = InputSpec(name="x", size=(16, 16), mean=mean, std=std)
    pixels = np.arange(256, dtype=np.float32).reshape(1, 1, 16, 16).repeat(3, axis=1)
    m, s = (np.asarray(v, np.float32).reshape(1, -1, 1, 1) for v in (mean, std))
    normalised = (pixels - m) / s
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    before = ov.Core().compile_model(model, "CPU", config)(normalised)[0]
    assert np.abs(before - normalised).max() > 1e-3  # the calibration range misses the pixels' levels
    assert input_quantizers_on_pixel_grid(model, spec) == 1
    after = ov.Core().compile_model(model, "CPU", config)(normalised)[0]
    np.testing.assert_allclose(after, normalised, rtol=0, atol=1e-6)


def test_openvino_folded_preprocessing_normalises_before_the_transpose_with_the_same_outputs(mbf_export, faces16):
    """The uint8 NHWC input folded into the graph (normalised in NHWC, then transposed) gives what
    the float graph gives on the same crops normalised outside, and what OpenVINO's own
    PrePostProcessor (transpose first) gives, RGB and BGR models alike."""
    import openvino as ov
    from openvino.preprocess import ColorFormat, PrePostProcessor

    from arcdeploy.engines.openvino import _fold_preprocessing
    from arcdeploy.manifest import InputSpec

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "f32"}
    crops = faces16[:5]
    for color, mean, std in (("RGB", 127.5, 127.5), ("BGR", (120.0, 127.5, 130.0), (60.0, 64.0, 70.0))):
        spec = InputSpec(name="input.1", size=(112, 112), color=color, mean=mean, std=std)
        ppp = PrePostProcessor(core.read_model(str(mbf_export.onnx_path)))
        ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC"))
        if color == "BGR":
            ppp.input().tensor().set_color_format(ColorFormat.RGB)
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        steps = ppp.input().preprocess().convert_element_type(ov.Type.f32)
        if color == "BGR":
            steps.convert_color(ColorFormat.BGR)
        steps.mean(list(mean) if isinstance(mean, tuple) else mean).scale(list(std) if isinstance(std, tuple) else std)
        theirs = core.compile_model(ppp.build(), "CPU", config)(crops)[0]
        folded = _fold_preprocessing(core.read_model(str(mbf_export.onnx_path)), spec)
        shape = folded.inputs[0].get_partial_shape()
        assert folded.inputs[0].get_element_type() == ov.Type.u8 and [d.get_length() for d in list(shape)[1:]] == [
            112,
            112,
            3,
        ]
        ours = core.compile_model(folded, "CPU", config)(crops)[0]
        x = crops[..., ::-1] if color == "BGR" else crops
        m, s = (np.asarray(v, np.float32).reshape(1, 1, 1, -1) for v in (mean, std))
        plain = core.compile_model(str(mbf_export.onnx_path), "CPU", config)(((x - m) / s).transpose(0, 3, 1, 2))[0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours, plain, rtol=1e-4, atol=1e-4)
