"""Issue 3: `arcdeploy check` / arcdeploy.fidelity.check against the stored fp32 reference."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

from arcdeploy import check
from arcdeploy.cli import main as cli_main
from arcdeploy.errors import ArcdeployError
from arcdeploy.fidelity import cosine_rows, summarize
from arcdeploy.package import load, read_manifest
from arcdeploy.synthetic import draw_face


def test_check_generated_images(r18_ort_fp32_pkg):
    res = check(r18_ort_fp32_pkg, count=12).to_json()
    c = res["cosine"]
    assert c["n"] == 12 and res["images"] == "generated"
    assert c["min"] <= c["p1"] <= c["mean"] <= c["max"] <= 1.0 + 1e-9
    assert c["min"] >= 0.99999 and res["passed"] is True
    assert res["reference"].startswith("pytorch fp32") and res["precision"] == "fp32"
    assert res["floor"] == {"min": 0.99999}


def test_cosine_summary_is_per_image():
    a = np.eye(4, 512, dtype=np.float32)
    b = a.copy()
    b[3] = -b[3]  # one image flipped: its cosine is -1, the mean is 0.5
    cos = cosine_rows(a, b)
    np.testing.assert_allclose(cos, [1, 1, 1, -1])
    s = summarize(cos)
    assert s["min"] == -1 and s["mean"] == pytest.approx(0.5) and s["n"] == 4


def test_check_cli_images_dir_json(tmp_path, r18_ort_fp32_pkg, faces16):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i, f in enumerate(faces16[:8]):
        cv2.imwrite(str(img_dir / f"{i}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    js = tmp_path / "check.json"
    assert cli_main(["check", str(r18_ort_fp32_pkg), "--images", str(img_dir), "--json", str(js)]) == 0
    data = json.loads(js.read_text())
    assert {"mean", "min", "p1"} <= set(data["cosine"]) and data["cosine"]["n"] == 8
    assert data["images"] == str(img_dir) and data["passed"] is True


def test_check_with_landmarks(tmp_path, r18_ort_fp32_pkg):
    img_dir = tmp_path / "photos"
    img_dir.mkdir()
    rows = []
    for i in range(6):
        img, lmk = draw_face(identity=i, variation=1, size=180)
        cv2.imwrite(str(img_dir / f"f{i}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        rows.append(f"f{i}.jpg " + " ".join(f"{v:.2f}" for v in lmk.ravel()))
    lmk_file = tmp_path / "lmk.txt"
    lmk_file.write_text("\n".join(rows) + "\n")
    res = check(r18_ort_fp32_pkg, images=img_dir, landmarks=lmk_file).to_json()
    assert res["cosine"]["n"] == 6 and res["passed"]


@pytest.mark.slow
def test_check_catches_a_wrong_model(tmp_path, r18_ort_fp32_pkg, mbf_export, capsys):
    """A package whose model is not its reference's network fails the check (exit 1)."""
    bad = tmp_path / "bad"
    shutil.copytree(r18_ort_fp32_pkg, bad)
    m = read_manifest(bad)
    shutil.copyfile(mbf_export.reference_path, bad / m["reference"]["file"])
    res = check(bad, count=8).to_json()
    assert res["passed"] is False and res["cosine"]["mean"] < 0.5 and res["below_floor"]
    assert cli_main(["check", str(bad), "--count", "8"]) == 1
    assert "below the floor" in capsys.readouterr().err


def test_check_errors(tmp_path, r18_ort_fp32_pkg, capsys):
    nopkg = tmp_path / "nothing"
    assert cli_main(["check", str(nopkg)]) == 2
    assert "no such package" in capsys.readouterr().err
    noref = tmp_path / "noref"
    shutil.copytree(r18_ort_fp32_pkg, noref)
    (noref / read_manifest(noref)["reference"]["file"]).unlink()
    assert cli_main(["check", str(noref)]) == 2
    err = capsys.readouterr().err.strip()
    assert "reference is missing" in err and len(err.splitlines()) == 1
    with pytest.raises(ArcdeployError, match="no usable check images"):
        bad_dir = tmp_path / "bad"
        bad_dir.mkdir()
        (bad_dir / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        check(load(r18_ort_fp32_pkg), images=bad_dir)


def test_reference_runs_once_for_the_same_content_and_faces(tmp_path, r18_packages, faces16, mbf_export, monkeypatch):
    """Packages of one source checked on the same faces run the fp32 reference once in a process
    (each package holds its own copy: the memo is keyed by its content); other faces or another
    reference run it again, and what the memo gives is what the reference computes."""
    from arcdeploy import fidelity

    ort, ov = r18_packages("onnxruntime", "fp32"), r18_packages("openvino", "fp32")  # built (and checked) before
    runs: list[int] = []
    init = fidelity.Reference.__init__

    def counting_init(self, *args, **kwargs):  # counts the faces each reference pass runs on
        init(self, *args, **kwargs)
        run = self.runner.run
        self.runner.run = lambda x: runs.append(len(x)) or run(x)

    monkeypatch.setattr(fidelity.Reference, "__init__", counting_init)
    fidelity._reference_memo.clear()
    assert load(ort).manifest.reference_path(ort) != load(ov).manifest.reference_path(ov)
    first = check(ort, images=faces16)
    memoised = check(ov, images=faces16)
    assert runs == [16] and first.passed and memoised.passed
    check(ort, images=faces16[:8])  # other faces
    assert runs == [16, 8]
    bad = tmp_path / "bad"  # another network's reference in a copy of the package
    shutil.copytree(ort, bad)
    shutil.copyfile(mbf_export.reference_path, bad / read_manifest(bad)["reference"]["file"])
    assert check(bad, images=faces16).cosine.mean < 0.5 and runs == [16, 8, 16]
    fidelity._reference_memo.clear()
    computed = check(ov, images=faces16)
    assert runs == [16, 8, 16, 16]
    np.testing.assert_allclose(computed.per_image, memoised.per_image, atol=1e-6)


def test_reference_digest_covers_an_onnx_files_external_data(tmp_path):
    """The memo's key for an ONNX reference covers the external data file it names: new weights
    there (the .onnx file untouched) give a new digest, so the reference runs again."""
    import os

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from arcdeploy.fidelity import _reference_digest

    w = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [w],
    )
    path = tmp_path / "ref.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="ref.data", size_threshold=0)
    data = tmp_path / "ref.data"
    first = _reference_digest(path, "onnx")
    assert _reference_digest(path, "onnx") == first != _reference_digest(path, "torchscript")
    data.write_bytes(data.read_bytes()[::-1])  # other weights, same size
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert _reference_digest(path, "onnx") != first
