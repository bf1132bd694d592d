"""The fidelity check by group, the calibration-set requirements and the precision choice: their
logic on hand-made inputs (the real-model tests are in test_int8_faithful.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arcdeploy.auto_precision import SAME_SPEED, candidates, choose
from arcdeploy.calibration_set import ONE_PERSON_COSINE, assess, enforce
from arcdeploy.errors import ArcdeployError
from arcdeploy.fidelity_groups import by_group, grayscale_mask, group_problems, labels_for, size_label, table
from arcdeploy.machine import has_native_bf16
from arcdeploy.manifest import CosineStats, FidelityGroupsRecord, FidelityRecord, PackageManifest, PrecisionChoiceRecord
from arcdeploy.quantize import ADVISED_CALIBRATION_FACES, MIN_CALIBRATION_FACES
from arcdeploy.types import Precision

FLOOR = {"mean": 0.99, "min": 0.97}


def _faces(n: int, colour: bool, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if colour:
        return rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)
    g = rng.integers(0, 256, (n, 112, 112, 1), dtype=np.uint8)
    return np.repeat(g, 3, axis=3)


def test_grayscale_is_told_from_colour():
    gray = _faces(3, colour=False)
    noisy = np.clip(gray.astype(int) + np.random.default_rng(1).integers(-1, 2, gray.shape), 0, 255).astype(np.uint8)
    assert grayscale_mask(gray).all() and grayscale_mask(noisy).all()  # JPEG-like chroma noise is still gray
    assert not grayscale_mask(_faces(3, colour=True)).any()
    tinted = gray.copy()
    tinted[..., 0] = np.clip(tinted[..., 0].astype(int) + 20, 0, 255)
    assert not grayscale_mask(tinted).any()


def test_labels_colour_size_and_folders(tmp_path):
    faces = np.concatenate([_faces(2, True), _faces(2, False)])
    names = [str(tmp_path / "women" / "a.jpg"), str(tmp_path / "women" / "b.jpg"), str(tmp_path / "men" / "c.jpg")]
    names.append(str(tmp_path / "men" / "d.jpg"))
    labels = labels_for(faces, names, [60.0, 150.0, 400.0, None], tmp_path)
    assert labels.axes["colour"] == ["colour", "colour", "grayscale", "grayscale"]
    assert labels.axes["face size"] == [size_label(60), size_label(150), size_label(400), "unknown"]
    assert size_label(60).startswith("small") and size_label(150).startswith("medium")
    assert labels.axes["folder"] == ["women", "women", "men", "men"]
    # images directly in the folder, or arrays without names: no folder axis
    flat = labels_for(faces, [str(tmp_path / f"{i}.jpg") for i in range(4)], None, tmp_path)
    assert "folder" not in flat.axes and flat.axes["face size"] == ["unknown"] * 4
    assert "folder" not in labels_for(faces).axes


def test_worst_group_is_the_verdict_not_the_mean():
    """The issue's case: 100 grayscale faces at 0.996 and 12 colour photos at 0.93-0.98 pass on the
    overall mean (0.99), but the colour group misses its floor, and the lowest faces are named."""
    cos = np.concatenate([np.full(100, 0.996), np.linspace(0.931, 0.982, 12)])
    faces = np.concatenate([_faces(100, False), _faces(12, True)])
    names = [f"gray_{i}.jpg" for i in range(100)] + [f"photo_{i}.jpg" for i in range(12)]
    grouped = by_group(cos, labels_for(faces, names), FLOOR)
    assert cos.mean() >= 0.99  # the old gate would have passed it
    assert not grouped.passed and grouped.worst == "colour: colour"
    colour = next(g for g in grouped.groups if g.group == "colour")
    assert colour.n == 12 and colour.min == pytest.approx(0.931) and not colour.passed
    assert any("min" in p for p in colour.below_floor) and any("mean" in p for p in colour.below_floor)
    assert grouped.lowest[0]["name"] == "photo_0.jpg" and grouped.lowest[0]["groups"]["colour"] == "colour"
    assert group_problems(grouped)[0].startswith("colour: colour:")
    text = table(grouped, FLOOR).text()
    assert "BELOW THE FLOOR" in text and "photo_0.jpg 0.9310" in text and "worst group: colour: colour" in text


def test_small_groups_are_held_to_the_min_only():
    cos = np.array([0.98, 0.985] + [0.995] * 20)
    faces = np.concatenate([_faces(2, True), _faces(20, False)])
    grouped = by_group(cos, labels_for(faces), FLOOR)
    small = next(g for g in grouped.groups if g.group == "colour")
    assert small.judged == ("min",) and small.passed  # mean 0.9825 of two faces is not judged
    assert grouped.passed
    assert "min only" in table(grouped, FLOOR).text()


def test_grouped_fidelity_is_typed_in_the_manifest():
    cos = np.array([0.95] + [0.995] * 9)
    grouped = by_group(cos, labels_for(_faces(10, True)), FLOOR)
    m = PackageManifest(engine="openvino", precision=Precision.INT8, arch="mbf", files={"model": "model.xml"})
    m.fidelity = FidelityRecord(
        cosine=CosineStats.of(cos),
        reference="fp32",
        images="test faces",
        images_source="array",
        engine="openvino",
        precision=Precision.INT8,
        floor=FLOOR,
        passed=False,
        below_floor=group_problems(grouped),
        groups=grouped,
    )
    data = json.loads(json.dumps(m.to_json()))
    back = PackageManifest.from_json(data, "manifest.json")
    assert back.fidelity == m.fidelity and back.fidelity.groups == grouped and not back.fidelity.groups.passed
    assert back.fidelity.worst_group == grouped.worst
    data["fidelity"]["groups"]["groups"][0]["min"] = "low"
    with pytest.raises(ArcdeployError, match=r"fidelity.groups.groups\[0\].min"):
        PackageManifest.from_json(data, "manifest.json")
    assert FidelityGroupsRecord.from_json(grouped.to_json(), "x") == grouped


def test_calibration_set_refused_under_the_minimum_with_a_way_out():
    rep = assess(_faces(MIN_CALIBRATION_FACES - 1, True), "calib/")
    with pytest.raises(ArcdeployError) as err:
        enforce(rep)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and f"at least {MIN_CALIBRATION_FACES}" in msg
    assert "--accept-calib" in msg and "bf16" in msg and msg.startswith("calib/:")
    enforce(rep, accept=True)  # accepted: built, with the refusal as a warning
    assert "accepted" in rep.warnings[0]


def test_calibration_set_warnings(caplog):
    def many(x):  # embeddings of different people: nearly orthogonal
        return np.random.default_rng(len(x)).normal(size=(len(x), 512))

    def one(x):  # one person: every face close to the same embedding
        rng = np.random.default_rng(0)
        return rng.normal(size=(1, 512)) + 0.3 * rng.normal(size=(len(x), 512))

    fine = assess(_faces(ADVISED_CALIBRATION_FACES, True), "ok/", many)
    assert fine.warnings == [] and fine.refusal is None and not fine.one_person
    few_gray = assess(_faces(40, False), "gray/", many)
    assert [w.split(": ")[1].split(" ")[0] for w in few_gray.warnings] == ["only", "every"]
    assert "grayscale" in few_gray.warnings[1] and "colour" in few_gray.warnings[1]
    person = assess(_faces(ADVISED_CALIBRATION_FACES, True), "me/", one)
    assert person.one_person and person.median_cosine >= ONE_PERSON_COSINE
    assert len(person.warnings) == 1 and "one person" in person.warnings[0]
    with caplog.at_level("WARNING"):
        enforce(person)
    assert "one person" in caplog.text
    js = person.to_json()
    assert js["people_check"]["looks_like_one_person"] and js["needs"]["min_faces"] == MIN_CALIBRATION_FACES


def _result(speed, passed=True, rounds=None):
    return {
        "images_per_s": speed,
        "rounds": rounds or [speed] * 3,
        "passed": passed,
        "worst_group": "colour: colour",
        "cosine": {"mean": 0.995, "min": 0.98},
    }


def test_choice_is_the_fastest_that_passes_every_group():
    c = choose({"fp32": _result(100), "bf16": _result(150), "int8": _result(300)})
    assert c.chosen == "int8" and "int8" in c.why.split(":")[0]
    assert next(x for x in c.candidates if x.precision == "int8").vs_fp32 == pytest.approx(3.0)
    # int8 below its floor on a group: bf16
    c = choose({"fp32": _result(100), "bf16": _result(150), "int8": _result(300, passed=False)})
    assert c.chosen == "bf16" and "int8 misses its floor" in c.why
    # about as fast (within SAME_SPEED): the more faithful one
    c = choose({"fp32": _result(100), "bf16": _result(222), "int8": _result(227)})
    assert 227 / 222 < SAME_SPEED and c.chosen == "bf16" and "more faithful" in c.why
    # left-out candidates are recorded with why
    c = choose({"fp32": _result(100)}, {"int8": "no calibration images (--calib)"})
    assert c.chosen == "fp32" and any(x.note == "no calibration images (--calib)" for x in c.candidates)
    assert PrecisionChoiceRecord.from_json(json.loads(json.dumps(c.to_json())), "m") == c
    with pytest.raises(ArcdeployError, match="no candidate met its fidelity floor"):
        choose({"fp32": _result(100, passed=False)})


def test_candidates_follow_the_cpu():
    plan = dict(candidates("openvino", calib="faces/"))
    assert plan["fp32"] is None
    assert (plan["bf16"] is None) == has_native_bf16()
    assert "int8" in plan
    assert dict(candidates("openvino"))["int8"] == "no calibration images (--calib)"
    assert set(dict(candidates("onnxruntime", calib="x"))) <= {"fp32", "fp16", "int8"}


def test_auto_is_a_request_not_a_precision():
    """``auto`` travels through the typed options as a request; the run expands it into this CPU's
    candidates, keeping the precisions already listed once."""
    from arcdeploy.auto_precision import expand
    from arcdeploy.options import BuildOptions, RunOptions

    opts = BuildOptions(precision="auto")
    assert opts.auto_precision and opts.precision is Precision.FP32 and opts.requested_precision == "auto"
    assert not BuildOptions(precision="int8").auto_precision
    with pytest.raises(ArcdeployError, match="unknown precision 'fastest'"):
        BuildOptions(precision="fastest")
    run = RunOptions(precisions=("fp32", "auto"))
    assert run.precisions == (Precision.FP32, "auto")
    wanted, left_out = expand(run.precisions, "openvino", None)
    assert wanted[0] is Precision.FP32 and wanted.count(Precision.FP32) == 1 and "auto" not in wanted
    assert Precision.INT8 not in wanted and left_out[Precision.INT8] == "no calibration images (--calib)"
    assert expand((Precision.INT8,), "openvino", None) == ([Precision.INT8], {})


def test_calibration_set_is_typed_in_the_manifest():
    from arcdeploy.manifest import CalibrationRecord, CalibrationSetRecord

    def many(x):
        return np.random.default_rng(len(x)).normal(size=(len(x), 512))

    rec = assess(_faces(40, False), "gray/", many).record()
    assert rec.count == 40 and rec.grayscale == 40 and rec.colour == 0 and rec.looks_like_one_person is False
    assert rec.min_faces == MIN_CALIBRATION_FACES and len(rec.warnings) == 2
    cal = CalibrationRecord(
        method="m",
        recipe={},
        count=40,
        kept_float=[],
        kept_float_why={},
        seven_bit_weights=False,
        float_layers_execute="f32",
        calibration_set=rec,
    )
    data = json.loads(json.dumps(cal.to_json()))
    assert data["set"]["needs"]["advised_faces"] == ADVISED_CALIBRATION_FACES
    assert data["set"]["people_check"]["looks_like_one_person"] is False
    assert CalibrationRecord.from_json(data, "m") == cal
    data["set"]["grayscale"] = 41
    with pytest.raises(ArcdeployError, match=r"calibration.set.grayscale"):
        CalibrationRecord.from_json(data, "m")
    unmeasured = assess(_faces(20, True), "colour/").record()  # no embedding: no people check recorded
    assert "people_check" not in unmeasured.to_json()
    assert CalibrationSetRecord.from_json(unmeasured.to_json(), "m") == unmeasured
