"""Trust, round 2: the newer features under faults and odd input (list and landmark files, file
names that could split a line, formats arcdeploy does not read, model files where a package is
expected, the Python API's compare, thread counts, SIGTERM, evaluation that writes only what it
was asked to)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

import arcdeploy
from arcdeploy.cli import main
from arcdeploy.errors import ArcdeployError, printable
from arcdeploy.faces.io import list_images
from arcdeploy.faces.landmarks import read_landmarks
from arcdeploy.synthetic import aligned_faces, draw_face
from real_material import MODELS, REAL, needs_real

SRC = Path(__file__).resolve().parents[1] / "src"


def _one_line_error(capsys, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


# ------------------------------------------------------------------ list files: rows are lines


def test_list_file_rows_are_its_lines(tmp_path, caplog):
    """Only \\n ends a line: a name holding U+2028, U+0085 or \\x0b stays one row, leading and
    trailing spaces are part of a name, CRLF and a BOM are understood, and skipped comment and
    blank lines are counted in a warning."""
    names = ["a\u2028b.jpg", "c\x85d.jpg", "e\x0bf.jpg", " g.jpg", "h.jpg "]
    data = b"\xef\xbb\xbf" + b"\n".join(os.fsencode(n) for n in names[:3]) + b"\r\n# a comment\n\n"
    data += b"\n".join(os.fsencode(n) for n in names[3:]) + b"\n"
    lst = tmp_path / "list.txt"
    lst.write_bytes(data)
    with caplog.at_level("WARNING"):
        paths = list_images(lst)
    assert [p.name for p in paths] == names
    assert "1 blank line and 1 comment line skipped" in caplog.text or (
        "1 comment line" in caplog.text and "1 blank line" in caplog.text
    )


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"GIF89a\x01\x00\x01\x00\x00\x00\x00", "GIF"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
    ],
)
def test_images_arcdeploy_does_not_read_are_named(tmp_path, capsys, head, kind):
    img = tmp_path / f"photo.{kind.lower()}"
    img.write_bytes(head + bytes(64))
    code = main(["detect", str(img), "--detector", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "f.txt")])
    assert code == 2
    _one_line_error(capsys, kind, "convert it to JPEG or PNG")
    # in a folder of images, the same file is a failed row that says what it is
    from arcdeploy.faces.io import decode_image
    from arcdeploy.faces.types import ImageError

    with pytest.raises(ImageError, match=f"a {kind}"):
        decode_image(img.read_bytes(), img.name)


# ------------------------------------------------------------------ landmark files


def test_landmark_file_name_twice_is_an_error_naming_both_lines(tmp_path):
    pts = " ".join(["50"] * 10)
    f = tmp_path / "lmk.txt"
    f.write_text(f"a.jpg {pts}\nb.jpg {pts}\na.jpg {pts}\n")
    with pytest.raises(ArcdeployError, match=r"lmk.txt:3: 'a.jpg' has a row already at line 1"):
        read_landmarks(f)


def test_landmark_file_byte_order_mark_is_ignored(tmp_path):
    pts = " ".join(["50"] * 10)
    f = tmp_path / "lmk.txt"
    f.write_bytes(b"\xef\xbb\xbf" + f"a.jpg {pts}\n".encode())
    assert read_landmarks(f).names == ["a.jpg"]


# ------------------------------------------------------------------ names that could split a line


def test_printable_escapes_what_would_split_a_line():
    assert printable("a\nb\tc\r\u2028" + os.fsdecode(b"\xe9")) == "a\\nb\\tc\\r\\u2028\\xe9"


def test_error_lines_escape_file_names(tmp_path, capsys, r18_ort_fp32_pkg):
    bad = tmp_path / "two\nlines.txt"
    code = main(["embed", str(r18_ort_fp32_pkg), "--images", str(bad), "-o", str(tmp_path / "f.npy")])
    assert code == 2
    _one_line_error(capsys, "two\\nlines.txt")


@needs_real("models/scrfd_500m_kps.onnx", "faces/photos")
def test_detect_writes_names_that_are_not_utf8(tmp_path, capsys):
    """A photo whose name is not UTF-8: its rows are written under the name's own bytes (they find
    the file again), not an encoding error after all the work."""
    src = sorted((REAL / "faces" / "photos").rglob("*.jpg"))[0]
    folder = tmp_path / "imgs"
    folder.mkdir()
    name = os.fsdecode(b"caf\xe9.jpg")
    (folder / name).write_bytes(src.read_bytes())
    out = tmp_path / "faces.txt"
    assert main(["detect", str(folder), "--detector", str(MODELS / "scrfd_500m_kps.onnx"), "-o", str(out)]) == 0
    rows = read_landmarks(out)
    assert rows.names == [name] and rows.find(folder / name, folder) is not None
    assert b"caf\xe9.jpg\t0\t" in out.with_name("faces.boxes.tsv").read_bytes()


# ------------------------------------------------------------------ what is given where


def test_a_model_file_given_as_package_says_what_to_do(tmp_path, r18_export, capsys):
    onnx = r18_export.onnx_path
    with pytest.raises(ArcdeployError, match="an ONNX model file, not a package.*arcdeploy build"):
        arcdeploy.load(onnx)
    code = main(["embed", str(onnx), "--images", str(tmp_path), "-o", str(tmp_path / "f.npy")])
    assert code == 2
    _one_line_error(capsys, "ONNX model file", "arcdeploy build")


def test_compare_takes_flip_rows_as_insightface_does(r18_ort_fp32_pkg):
    pkg = arcdeploy.load(r18_ort_fp32_pkg)
    faces = aligned_faces(2, seed=5)
    flipped = pkg.embed(faces, flip=True, raw=True)  # [2, 2, D]
    a, b = flipped[0].sum(axis=0), flipped[1].sum(axis=0)
    want = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert arcdeploy.compare(flipped[0], flipped[1]) == pytest.approx(want, abs=1e-6)
    with pytest.raises(ArcdeployError, match="shape"):
        arcdeploy.compare(np.zeros((3, 2, 512)), np.zeros(512))


@pytest.mark.parametrize("command", ["embed", "detect"])
def test_min_face_nan_is_refused(tmp_path, capsys, command):
    extra = ["--images", str(tmp_path)] if command == "embed" else [str(tmp_path)]
    pkg = [str(tmp_path)] if command == "embed" else []
    code = main([command, *pkg, *extra, "--detector", "d.onnx", "--min-face", "nan", "-o", str(tmp_path / "o")])
    assert code == 2
    _one_line_error(capsys, "--min-face", "nan")


def test_thread_counts_beyond_the_machine_are_refused(r18_ort_fp32_pkg, tmp_path, capsys):
    with pytest.raises(ArcdeployError, match="threads 1000: this machine gives this process"):
        arcdeploy.load(r18_ort_fp32_pkg, threads=1000)
    code = main(["embed", str(r18_ort_fp32_pkg), "--images", str(tmp_path), "--workers", "100000", "-o", "x.npy"])
    assert code == 2
    _one_line_error(capsys, "workers 100000")


def test_package_close_and_context_manager(r18_ort_fp32_pkg):
    faces = aligned_faces(2, seed=1)
    with arcdeploy.load(r18_ort_fp32_pkg) as pkg:
        first = pkg.infer(faces)
        assert pkg.loaded
    assert not pkg.loaded
    with pytest.raises(ArcdeployError, match="closed"):
        pkg.infer(faces)
    pkg.close()  # twice is fine
    assert np.array_equal(arcdeploy.load(r18_ort_fp32_pkg).infer(faces), first)


# ------------------------------------------------------------------ evaluation writes what was asked


def test_eval_ijb_features_without_output_writes_nothing(tmp_path, monkeypatch, capsys):
    from arcdeploy.demo.datasets import write_ijb_set

    root = write_ijb_set(tmp_path / "ijb", identities=4, seed=2)
    n = len((root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines())
    feats = tmp_path / "f.npy"
    np.save(feats, np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32))
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    args = ["eval", "ijb", "--root", str(root), "--target", "IJBC", "--features", str(feats), "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args + ["--no-detector-score"]) == 0  # another mode, then the same command again: no refusal
    assert main(args) == 0
    assert "Methods" in first and capsys.readouterr().out.count("Methods") == 2
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------ SIGTERM


def _scratch(tmp: Path, prefix: str) -> list[Path]:
    return [p for p in tmp.iterdir() if p.name.startswith(prefix)]


@pytest.mark.slow
def test_sigterm_during_build_leaves_no_temporary_folders(tmp_path, r18_ckpt):
    """SIGTERM is handled as Ctrl-C is: every temporary folder is removed on the way out, the
    package is not written, and the exit status says it was terminated."""
    tmp = Path(tempfile.mkdtemp(prefix="ardterm-"))
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, face in enumerate(aligned_faces(40, seed=3)):
        cv2.imwrite(str(calib / f"{i}.png"), face[..., ::-1])
    out = tmp_path / "pkg"
    args = [
        "build",
        str(r18_ckpt),
        "--engine",
        "openvino",
        "--precision",
        "int8",
        "--calib",
        str(calib),
        "-o",
        str(out),
    ]
    proc = subprocess.Popen([sys.executable, "-m", "arcdeploy", *args], env=env, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 300
        while not _scratch(tmp, "arcdeploy-build-") and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(1.0)  # well inside the export or the build
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "terminated" in err
    assert not out.exists()
    assert not _scratch(tmp, "arcdeploy-"), list(tmp.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pkg")]  # no half-written package


# ------------------------------------------------------------------ Ray: bounded, and only where asked


ray_needed = pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None, reason="Ray is not installed (pip install 'arcdeploy[ray]')"
)


@ray_needed
@pytest.mark.parametrize("how", ["flag", "env"])
def test_ray_address_where_nothing_listens_fails_at_once(tmp_path, r18_ort_fp32_pkg, how):
    img = tmp_path / "face.png"
    cv2.imwrite(str(img), draw_face(0, 0, size=112)[0])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    args = ["embed", str(r18_ort_fp32_pkg), "--images", str(img), "-o", str(tmp_path / "f.npy"), "-q"]
    if how == "flag":
        args += ["--ray", "127.0.0.1:1"]
    else:
        args += ["--ray"]
        env["RAY_ADDRESS"] = "127.0.0.1:1"
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "arcdeploy", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert time.monotonic() - t0 < 60
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "127.0.0.1:1" in lines[0] and "cannot reach" in lines[0], res.stderr
