"""int8 that stays faithful on faces unlike its calibration set: real trained networks (the mbf and
insightface's w600k_mbf.onnx), OpenVINO and ONNX Runtime, calibrated on grayscale or on colour faces,
each held to the int8 floor (mean >= 0.99, min >= 0.97) on colour photos, grayscale and colour faces
of people the calibration never saw, and small faces found by the detector; the gate reports by
group; calibration sets are checked; --precision auto keeps the fastest precision that is faithful.

Uses ../shared/real; skipped with a reason when it is absent. Each package is built once per session
by ``faithful_packages`` in conftest.py (the mbf's grayscale-calibrated ones are shared with
test_real_models.py, the w600k's ONNX Runtime one with test_onnx_source.py)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from arcdeploy import build, check, load
from arcdeploy.cli import main as cli_main
from arcdeploy.errors import ArcdeployError
from arcdeploy.fidelity import FLOORS
from conftest import GROUPS_IN_CHECK, REAL_CALIB_COUNT
from real_material import FACES, MODELS, needs_real

pytestmark = [
    pytest.mark.slow,
    needs_real(
        "models/mbf_w600k_gdc.pth",
        "models/w600k_mbf.onnx",
        "models/scrfd_500m_kps.onnx",
        "faces/lfw_5pts.txt",
        "faces/photos_5pts.txt",
        "faces/lfw_colour_5pts.txt",
        "faces/lfw_colour_groups.tsv",
    ),
]

SCRFD = MODELS / "scrfd_500m_kps.onnx"
W600K = MODELS / "w600k_mbf.onnx"
INT8 = FLOORS["int8"]
CALIB_COUNT = REAL_CALIB_COUNT


# every model, engine and kind of calibration set at least once (4 builds, 2 of them shared)
CASES = [
    ("mbf", "openvino", "gray"),
    ("mbf", "onnxruntime", "gray"),
    ("mbf", "openvino", "colour"),
    ("w600k", "openvino", "gray"),
    ("w600k", "onnxruntime", "colour"),
]


def _by_group(pkg, material):
    """The check folder's result by group: the build's own gate when it ran on that folder (the
    packages built here), else a check (the shared mbf packages were gated on held-out LFW)."""
    fid = load(pkg).manifest.fidelity
    if fid.images_source == str(material["check"]):
        return fid.cosine, fid.groups
    res = check(pkg, images=material["check"], landmarks=material["check_5pts"])
    return res.cosine, res.groups


@pytest.mark.parametrize("model,engine,calibration", CASES)
def test_int8_floor_on_faces_unlike_the_calibration_set(faithful_packages, material, model, engine, calibration):
    pkg = faithful_packages(model, engine, calibration)
    m = load(pkg).manifest
    assert "depthwise" in m.calibration.kept_float_why and m.calibration.recipe["range_estimator"] == "max_quantile"
    cos, grouped = _by_group(pkg, material)
    what = (model, engine, calibration)
    assert cos.mean >= INT8["mean"] and cos.min >= INT8["min"], (what, cos, grouped.lowest[:3])
    assert grouped.passed, (what, [g for g in grouped.groups if not g.passed])
    groups = {(g.axis, g.group): g for g in grouped.groups}
    assert {("colour", "colour"), ("colour", "grayscale"), ("folder", "photos"), ("folder", "lfw_grayscale")} <= set(
        groups
    )
    for group in GROUPS_IN_CHECK:  # each colour LFW group, people the calibration never saw
        g = groups[("folder", f"lfw_colour_{group}")]
        assert g.passed and g.n >= 8 and "mean" in g.judged, g
    photos = groups[("folder", "photos")]
    assert photos.n == 12 and photos.min >= INT8["min"]  # the colour photos: 0.93 with the previous recipe
    small = check(pkg, images=material["small"], detector=SCRFD)
    c = small.cosine
    assert c.mean >= INT8["mean"] and c.min >= INT8["min"] and small.passed, (what, c, small.groups.lowest[:3])
    assert c.n == 36 and any(g.group.startswith("small") for g in small.groups.groups)


def test_build_gate_reports_by_group(faithful_packages, material):
    """The build's own check is by group, recorded typed in the manifest, the worst group the verdict."""
    m = load(faithful_packages("w600k", "openvino", "gray")).manifest
    fg = m.fidelity.groups
    assert fg is not None and fg.passed and m.fidelity.passed
    axes = {g.axis for g in fg.groups}
    assert {"colour", "face size", "folder"} <= axes
    assert fg.worst in {g.label for g in fg.groups} and len(fg.lowest) >= 5
    assert fg.lowest[0]["cosine"] == pytest.approx(m.fidelity.cosine.min, abs=1e-6)
    cal_set = m.calibration.calibration_set
    assert cal_set.count == CALIB_COUNT and cal_set.grayscale == CALIB_COUNT
    assert any("grayscale" in w for w in cal_set.warnings)  # all grayscale: warned, with what to do
    assert cal_set.looks_like_one_person is False


def test_check_cli_prints_the_grouped_table(faithful_packages, material, tmp_path, capsys):
    pkg = faithful_packages("mbf", "openvino", "gray")
    out = tmp_path / "check.json"
    code = cli_main(
        [
            "check",
            str(pkg),
            "--images",
            str(material["check"]),
            "--landmarks",
            str(material["check_5pts"]),
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert "verdict: passed on every group" in text and "lowest faces:" in text
    for row in ("colour     colour", "grayscale", "folder", "photos", "lfw_colour_black"):
        assert row in text, row
    import json

    js = json.loads(out.read_text())
    assert js["groups"]["passed"] and {g["axis"] for g in js["groups"]["groups"]} >= {"colour", "folder"}


def test_one_person_is_warned_by_the_model_itself():
    """The one-person check uses the fp32 model: 8 photos of one LFW person and their mirror images
    look like one person; 16 faces of 16 people do not."""
    from arcdeploy.calibration_set import assess
    from arcdeploy.engines.registry import open_graph
    from arcdeploy.faces.calibration import load_images
    from arcdeploy.manifest import InputSpec

    session = open_graph(W600K, engine="onnxruntime")

    def embed(faces):
        return session.run_one(InputSpec().to_model_input(faces))

    person = sorted(p for p in (FACES / "lfw").iterdir() if p.is_dir())[0]
    one = load_images(sorted(person.glob("*.jpg")), FACES / "lfw_5pts.txt").faces
    one = np.concatenate([one, one[:, :, ::-1]])
    rep = assess(one, person.name, embed)
    assert rep.one_person and any("one person" in w for w in rep.warnings), rep.median_cosine
    people = sorted(p for p in (FACES / "lfw").iterdir() if p.is_dir())[:16]
    many = load_images([sorted(p.glob("*.jpg"))[0] for p in people], FACES / "lfw_5pts.txt").faces
    rep = assess(many, "16 people", embed)
    assert not rep.one_person and rep.median_cosine < 0.2


def test_too_few_calibration_faces_are_refused(tmp_path, r18_export, faces16, capsys):
    out = tmp_path / "pkg"
    with pytest.raises(ArcdeployError, match=r"8 usable calibration face\(s\).*at least 16.*--accept-calib"):
        build(r18_export.out_dir, out, engine="openvino", precision="int8", calib=faces16[:8])
    assert not out.exists()
    code = cli_main(["build", str(r18_export.out_dir), "--precision", "int8", "--calib", str(tmp_path), "-o", str(out)])
    assert code == 2 and not out.exists()


def test_precision_auto_keeps_the_fastest_faithful_precision(tmp_path, r18_export, capsys, monkeypatch):
    """--precision auto on this CPU: the candidates its flags allow, each checked by group and timed in
    turns; the package is the fastest that passes every group (speeds within 10% count as equal)."""
    from arcdeploy import auto_precision
    from arcdeploy.auto_precision import SAME_SPEED

    monkeypatch.setattr(auto_precision, "SPEED_SECONDS", 0.3)  # rounds shorter than a user's
    monkeypatch.setattr(auto_precision, "SPEED_ROUNDS", 2)  # and fewer (a user's: 3)
    from arcdeploy.machine import has_native_bf16
    from arcdeploy.synthetic import aligned_faces

    calib = tmp_path / "calib"
    calib.mkdir()
    for i, face in enumerate(aligned_faces(48, seed=11)):
        cv2.imwrite(str(calib / f"{i:03d}.png"), cv2.cvtColor(face, cv2.COLOR_RGB2BGR))
    out = tmp_path / "auto"
    code = cli_main(
        [
            "build",
            str(r18_export.out_dir),
            "--precision",
            "auto",
            "--calib",
            str(calib),
            "--calib-count",
            "32",
            "-o",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    m = load(out).manifest
    pc = m.precision_choice
    assert m.requested_precision == "auto" and m.precision == pc.chosen and "precision auto:" in text
    built = {c.precision: c for c in pc.candidates if c.images_per_s}
    assert set(built) >= {"fp32", "int8"} and ("bf16" in built) == has_native_bf16()
    chosen = built[pc.chosen]
    assert chosen.passed and m.fidelity.passed and m.fidelity.groups.passed
    fastest = max((c for c in built.values() if c.passed), key=lambda c: c.images_per_s)
    assert chosen.images_per_s * SAME_SPEED >= fastest.images_per_s
    assert pc.why.startswith(pc.chosen) and pc.cpu and "interleaved" in pc.how
    assert built["fp32"].vs_fp32 == pytest.approx(1.0)
