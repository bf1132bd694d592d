"""Trust under faults, core side: thread safety of every engine, packages that point outside themselves,
broken manifests and models, what a checkpoint really is, NaN weights, litter of killed runs,
file permissions, full disks, concurrent writers, and outputs that are never replaced silently."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from arcdeploy import build
from arcdeploy.cli import main as cli_main
from arcdeploy.errors import ArcdeployError, first_line
from arcdeploy.files import FileLock, atomic_dir, clean_stale, scratch_dir, write_json_atomic
from arcdeploy.manifest import MANIFEST_NAME, PACKAGE_FORMAT_VERSION
from arcdeploy.package import load
from arcdeploy.sources.checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def engine_packages(r18_packages):
    """One small package per engine (and OpenVINO int8): the session's shared r18 packages."""
    combos = (("openvino", "fp32"), ("openvino", "int8"), ("onnxruntime", "fp32"), ("torch", "fp32"))
    return {combo: r18_packages(*combo) for combo in combos}


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine,precision", [("openvino", "fp32"), ("openvino", "int8"), ("onnxruntime", "fp32"), ("torch", "fp32")]
)
def test_runtime_is_thread_safe(engine_packages, engine, precision):
    """Package.infer from 8 threads at once returns exactly what serial calls return."""
    from arcdeploy.synthetic import aligned_faces

    pkg = load(engine_packages[(engine, precision)])
    faces = aligned_faces(24, seed=77)
    batches = [faces[i : i + 3] for i in range(0, 24, 3)]
    serial = [pkg.infer(b) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        for _round in range(3):
            parallel = list(pool.map(pkg.infer, batches))
            for got, want in zip(parallel, serial):
                np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_embed_from_threads_matches_serial(engine_packages):
    from arcdeploy.synthetic import aligned_faces

    pkg = load(engine_packages[("openvino", "int8")])
    faces = aligned_faces(16, seed=8)
    want = pkg.embed(faces)
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: pkg.embed(faces), range(8)):
            np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------- manifests


def _copy_pkg(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(pkg: Path, fn) -> None:
    mf = pkg / MANIFEST_NAME
    data = json.loads(mf.read_text())
    fn(data)
    mf.write_text(json.dumps(data))


@pytest.mark.parametrize("bad", ["../../outside.onnx", "/etc/passwd", "a/../../b.onnx", "C:\\model.onnx"])
def test_manifest_files_stay_inside_the_package(tmp_path, r18_ort_fp32_pkg, bad):
    pkg = _copy_pkg(r18_ort_fp32_pkg, tmp_path / "pkg")
    _edit_manifest(pkg, lambda m: m["files"].__setitem__("model", bad))
    with pytest.raises(ArcdeployError, match="outside the package"):
        load(pkg)


def test_reference_cannot_leave_the_package(tmp_path, r18_ort_fp32_pkg):
    pkg = _copy_pkg(r18_ort_fp32_pkg, tmp_path / "pkg")
    _edit_manifest(pkg, lambda m: m["reference"].__setitem__("file", "../elsewhere/model.pt"))
    with pytest.raises(ArcdeployError, match="outside the package"):
        load(pkg)


def test_a_link_out_of_the_package_is_refused(tmp_path, r18_ort_fp32_pkg):
    pkg = _copy_pkg(r18_ort_fp32_pkg, tmp_path / "pkg")
    foreign = tmp_path / "foreign.onnx"
    shutil.copyfile(pkg / "model.onnx", foreign)
    (pkg / "model.onnx").unlink()
    (pkg / "model.onnx").symlink_to(foreign)
    with pytest.raises(ArcdeployError, match="outside the package"):
        load(pkg).infer(np.zeros((1, 112, 112, 3), np.uint8))


def test_broken_manifests_are_one_line_errors(tmp_path, r18_ort_fp32_pkg, capsys):
    pkg = _copy_pkg(r18_ort_fp32_pkg, tmp_path / "pkg")
    _edit_manifest(pkg, lambda m: m.pop("engine"))
    assert cli_main(["bench", str(pkg), "--batch", "1", "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "manifest.json" in err and "'engine'" in err and "KeyError" not in err

    _edit_manifest(
        pkg, lambda m: m.update(engine="onnxruntime", format=f"arcdeploy-package/{PACKAGE_FORMAT_VERSION + 1}")
    )
    with pytest.raises(ArcdeployError, match="made by a newer arcdeploy"):
        load(pkg)
    _edit_manifest(pkg, lambda m: m.update(format="something-else/1"))
    with pytest.raises(ArcdeployError, match="not a built package"):
        load(pkg)
    (pkg / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArcdeployError, match="not valid JSON"):
        load(pkg)


@pytest.mark.slow
def test_engine_load_failure_names_file_and_reason(tmp_path, engine_packages, capsys):
    pkg = _copy_pkg(engine_packages[("openvino", "fp32")], tmp_path / "pkg")
    (pkg / "model.xml").write_text("<net><broken")
    assert cli_main(["bench", str(pkg), "--batch", "1", "--iterations", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "model.xml" in err and "Exception from" not in err and "core.cpp" not in err


def test_first_line_skips_location_lines():
    exc = RuntimeError(
        "Exception from src/inference/src/cpp/core.cpp:84:\n"
        "Exception from src/inference/src/model_reader.cpp:148:\nUnable to read the model: x.xml\n"
    )
    assert first_line(exc) == "Unable to read the model: x.xml"
    assert first_line(ValueError("")) == "ValueError"


# ---------------------------------------------------------------- what a checkpoint is


def test_torchscript_onnx_and_random_files_are_named(tmp_path, r18_export):
    ts = tmp_path / "traced.pth"
    shutil.copyfile(r18_export.reference_path, ts)
    with pytest.raises(ArcdeployError, match="a TorchScript model, not a checkpoint"):
        read_checkpoint(ts)
    onnx_as_pth = tmp_path / "model.pth"
    shutil.copyfile(r18_export.onnx_path, onnx_as_pth)
    with pytest.raises(ArcdeployError, match="an ONNX model, not a checkpoint"):
        read_checkpoint(onnx_as_pth)
    rnd = tmp_path / "random.pth"
    rnd.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ArcdeployError, match="not a PyTorch checkpoint") as info:
        read_checkpoint(rnd)
    assert "refused" not in str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_rejected(tmp_path, r18_state_dict, value):
    sd = {k: v.clone() for k, v in r18_state_dict.items()}
    sd["layer2.0.conv1.weight"][0, 0, 0, 0] = value
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ArcdeployError, match="layer2.0.conv1.weight.*NaN or infinite"):
        read_checkpoint(path)
    assert cli_main(["export", str(path), "-o", str(tmp_path / "exp")]) == 2
    assert not (tmp_path / "exp").exists()


# ---------------------------------------------------------------- files


@pytest.mark.slow
def test_stale_litter_of_killed_runs_is_cleaned(tmp_path, r18_export):
    dead = _dead_pid()
    out = tmp_path / "pkg"
    litter = tmp_path / f".pkg.tmp-{dead}-abcd1234"
    litter.mkdir()
    (litter / "model.bin").write_bytes(b"x" * 1000)
    alive = tmp_path / f".pkg.tmp-{os.getpid()}-live0000"
    alive.mkdir()
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"arcdeploy-build-{dead}-zz"
    scratch.mkdir(exist_ok=True)
    build(r18_export.out_dir, out, engine="onnxruntime", precision="fp32", check_count=4)
    assert out.is_dir() and not litter.exists() and not scratch.exists()
    assert alive.exists()  # a live process's work is left alone


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_outputs_follow_the_umask(tmp_path):
    code = (
        "import os, sys\n"
        "os.umask(0o027)\n"
        "from arcdeploy.files import write_json_atomic, atomic_dir\n"
        "write_json_atomic(sys.argv[1] + '/a.json', {'x': 1})\n"
        "with atomic_dir(sys.argv[1] + '/d') as d:\n"
        "    (d / 'f.txt').write_text('y')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_a_full_disk_is_one_line_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_json_atomic(target, {"good": True})

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(ArcdeployError, match=r"result.json: cannot write \(no space left on device\)"):
        write_json_atomic(target, {"good": False})
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert json.loads(target.read_text()) == {"good": True}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary file left


def test_atomic_dir_failure_keeps_old_contents(tmp_path):
    final = tmp_path / "pkg"
    final.mkdir()
    (final / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(final, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in final.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["pkg"]
    with pytest.raises(ArcdeployError, match="already exists"), atomic_dir(final):
        pass


def test_file_lock_refuses_a_second_writer(tmp_path):
    target = tmp_path / "feats.npy"
    code = (
        "import sys, time\n"
        "from arcdeploy.files import FileLock\n"
        "with FileLock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(30)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ArcdeployError, match="being written by another arcdeploy process"):
            FileLock(target).acquire()
    finally:
        holder.kill()
        holder.wait()
    with FileLock(target):  # free again once the holder is gone
        pass


def test_clean_stale_and_scratch_dir(tmp_path):
    dead = _dead_pid()
    (tmp_path / f".x.npy.tmp-{dead}-0001").write_text("partial")
    (tmp_path / "user.txt").write_text("mine")
    removed = clean_stale(tmp_path)
    assert [p.name for p in removed] == [f".x.npy.tmp-{dead}-0001"]
    assert (tmp_path / "user.txt").exists()
    with scratch_dir("unit") as work:
        assert work.is_dir() and str(os.getpid()) in work.name
    assert not work.exists()


# ---------------------------------------------------------------- outputs are not replaced silently


def test_json_outputs_need_force(tmp_path, r18_ort_fp32_pkg, capsys):
    js = tmp_path / "out.json"
    js.write_text("user's file")
    assert cli_main(["check", str(r18_ort_fp32_pkg), "--count", "2", "--json", str(js)]) == 2
    assert "already exists" in capsys.readouterr().err and js.read_text() == "user's file"
    assert cli_main(["bench", str(r18_ort_fp32_pkg), "--batch", "1", "--iterations", "1", "--json", str(js)]) == 2
    assert js.read_text() == "user's file"
    assert cli_main(["check", str(r18_ort_fp32_pkg), "--count", "2", "--json", str(js), "--force"]) == 0
    assert json.loads(js.read_text())["cosine"]["n"] == 2


def test_run_refuses_a_folder_it_did_not_make(tmp_path, r18_ckpt, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    (out / "export").mkdir()
    (out / "export" / "keep.bin").write_bytes(b"1")
    code = cli_main(["run", str(r18_ckpt), "-o", str(out), "--engine", "onnxruntime", "--precisions", "fp32"])
    assert code == 2
    err = capsys.readouterr().err
    assert "not made by arcdeploy run" in err and "--force" in err
    assert (out / "notes.txt").read_text() == "the user's notes" and (out / "export" / "keep.bin").exists()
    assert sorted(p.name for p in out.iterdir()) == ["export", "notes.txt"]
