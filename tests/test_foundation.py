"""Issue 2: official backbones, checkpoint loading, export, one-line errors."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from arcdeploy.backbones import ARCHS, build_model, detect_arch
from arcdeploy.errors import ArcdeployError
from arcdeploy.exporter import export
from arcdeploy.sources.checkpoint import load_backbone, read_checkpoint
from arcdeploy.sources.verify import verification_inputs as reference_inputs

# SPEC section 2: key counts (with num_batches_tracked) and fp32 sizes
KEY_COUNTS = {"r18": 187, "r34": 331, "r50": 475, "r100": 925, "r200": 1807}
SIZES_MIB = {"r18": 91.7, "r50": 166.4, "r100": 248.8}


@pytest.mark.parametrize("arch", ARCHS)
def test_official_layout_strict_load_and_detection(arch):
    sd = build_model(arch).state_dict()
    if arch in KEY_COUNTS:
        assert len(sd) == KEY_COUNTS[arch]
    if arch in SIZES_MIB:
        mib = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
        assert round(mib, 1) == SIZES_MIB[arch]
    assert detect_arch(sd) == arch
    fresh = build_model(arch)
    fresh.load_state_dict(sd, strict=True)


def test_iresnet_layout_details():
    sd = build_model("r18").state_dict()
    assert sd["conv1.weight"].shape == (64, 3, 3, 3)
    assert sd["layer1.0.downsample.0.weight"].shape == (64, 64, 1, 1)
    assert sd["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd["fc.weight"].shape == (512, 25088) and "fc.bias" in sd
    assert sd["features.running_var"].shape == (512,)
    assert not any(k.endswith("conv1.bias") for k in sd)
    model = build_model("r18")
    assert model.layer1[0].conv2.stride == (2, 2) and model.layer1[0].conv1.stride == (1, 1)
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_mbf_layout_details():
    sd = build_model("mbf").state_dict()
    assert sd["features.layers.0.layers.0.weight"].shape == (512, 1, 7, 7)
    assert sd["features.layers.2.weight"].shape == (512, 512)
    assert "features.layers.2.bias" not in sd
    assert "features.layers.3.running_mean" in sd
    assert sd["layers.0.layers.0.weight"].shape == (128, 3, 3, 3)  # width scale 2


def test_checkpoint_roundtrip_gives_same_output(r18_ckpt, r18_state_dict):
    model, info = load_backbone(r18_ckpt)
    assert info.arch == "r18" and info.notes == []
    ref = build_model("r18")
    ref.load_state_dict(r18_state_dict)
    x = torch.from_numpy(reference_inputs(2))
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


@pytest.mark.parametrize("wrap", ["ddp", "state_dict", "model", "fp16", "ddp+state_dict"])
def test_wrapped_checkpoints_load(tmp_path, r18_state_dict, wrap):
    sd = dict(r18_state_dict)
    if "fp16" in wrap:
        sd = {k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}
    if "ddp" in wrap:
        sd = {f"module.{k}": v for k, v in sd.items()}
    obj = {"state_dict": sd, "epoch": 3} if "state_dict" in wrap else {"model": sd} if wrap == "model" else sd
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model, info = load_backbone(path)
    assert info.arch == "r18"
    assert info.notes  # says what was unwrapped/converted
    ref = build_model("r18")
    ref.load_state_dict(r18_state_dict)
    x = torch.from_numpy(reference_inputs(1))
    with torch.no_grad():
        diff = (model(x) - ref(x)).abs().max().item()
    assert diff < (5e-2 if wrap == "fp16" else 1e-6)


def test_mbf_checkpoint_detected(mbf_ckpt):
    assert read_checkpoint(mbf_ckpt).arch == "mbf"


class _Boom:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('PWNED_MARKER').write_text('x')",))


def test_errors_are_clear(tmp_path, r18_ckpt, r18_state_dict):
    with pytest.raises(ArcdeployError, match="no such file"):
        read_checkpoint(tmp_path / "missing.pth")
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a checkpoint\n")
    with pytest.raises(ArcdeployError, match="not a PyTorch checkpoint"):
        read_checkpoint(text)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ArcdeployError, match="empty"):
        read_checkpoint(empty)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(r18_ckpt.read_bytes()[:1_000_000])
    with pytest.raises(ArcdeployError, match="truncated"):
        read_checkpoint(truncated)
    odd = tmp_path / "odd.pth"
    torch.save({"encoder.weight": torch.zeros(3), "head.bias": torch.zeros(2)}, odd)
    with pytest.raises(ArcdeployError, match="unknown layout.*2 keys"):
        read_checkpoint(odd)
    with pytest.raises(ArcdeployError, match="is r18, but r50 was asked"):
        read_checkpoint(r18_ckpt, arch="r50")


def test_hostile_pickle_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        pickle.dump({"conv1.weight": _Boom()}, f)
    with pytest.raises(ArcdeployError, match="evil.pth"):
        read_checkpoint(evil)
    assert not (tmp_path / "PWNED_MARKER").exists()
    evil_zip = tmp_path / "evil_zip.pth"
    torch.save({"conv1.weight": _Boom()}, evil_zip)
    with pytest.raises(ArcdeployError, match="refused"):
        read_checkpoint(evil_zip)
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_mismatched_shapes_name_the_problem(tmp_path, r18_state_dict):
    sd = dict(r18_state_dict)
    del sd["layer1.0.bn1.weight"]
    path = tmp_path / "broken.pth"
    torch.save(sd, path)
    with pytest.raises(ArcdeployError, match="missing 1 such as 'layer1.0.bn1.weight'"):
        load_backbone(path)


def test_export_writes_files_and_manifest(r18_export, r18_ckpt):
    out = r18_export.out_dir
    assert {p.name for p in out.iterdir()} == {"model.onnx", "model.pt", "manifest.json"}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == "r18"
    assert manifest["input"]["layout"] == "NCHW" and manifest["input"]["color"] == "RGB"
    assert manifest["input"]["normalize"] == {"mean": 127.5, "std": 127.5}
    assert manifest["opset"] == 17
    import hashlib

    assert manifest["source"]["sha256"] == hashlib.sha256(r18_ckpt.read_bytes()).hexdigest()
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["verification"]["relative_error"]["onnx"] <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("which", ["r18", "mbf"])
def test_onnx_dynamic_batch_matches_pytorch(which, r18_export, mbf_export, r18_ckpt, mbf_ckpt):
    res = r18_export if which == "r18" else mbf_export
    model, _ = load_backbone(r18_ckpt if which == "r18" else mbf_ckpt)
    sess = ort.InferenceSession(str(res.onnx_path), providers=["CPUExecutionProvider"])
    inp, out = sess.get_inputs()[0], sess.get_outputs()[0]
    assert inp.shape[0] == out.shape[0] == "batch"
    assert inp.shape[1:] == [3, 112, 112] and out.shape[1] == 512
    x = reference_inputs(64, seed=5)
    for b in (1, 5, 64):
        got = sess.run(None, {inp.name: x[:b]})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x[:b])).numpy()
        assert got.shape == (b, 512)
        rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
        assert rel.max() < 1e-4


def test_torchscript_matches_pytorch(r18_export, r18_ckpt):
    model, _ = load_backbone(r18_ckpt)
    ts = torch.jit.load(str(r18_export.reference_path))
    x = torch.from_numpy(reference_inputs(3, seed=9))
    with torch.no_grad():
        assert torch.allclose(ts(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_existing_folder(r18_export, r18_ckpt):
    with pytest.raises(ArcdeployError, match="already exists; use --force"):
        export(r18_ckpt, r18_export.out_dir)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "arcdeploy", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, r18_ckpt):
    cases = [
        (["export", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "o1")], "no such file"),
        (["export", str(r18_ckpt), "--arch", "r100", "-o", str(tmp_path / "o2")], "is r18, but r100"),
    ]
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    cases.append((["export", str(r18_ckpt), "-o", str(tmp_path / "exists")], "already exists"))
    for argv, expected in cases:
        proc = _cli(*argv)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert expected in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_cli_export_end_to_end(tmp_path, mbf_ckpt):
    proc = _cli("export", str(mbf_ckpt), "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "mbf" in proc.stdout
    assert (tmp_path / "out" / "model.onnx").exists()
