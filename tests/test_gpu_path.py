"""The GPU path on a machine without one: clear errors, and the CPU side of the same code.

The GPU measurement itself is benchmarks/gpu_check.py, run on a CUDA machine; here its code runs
end to end on the CPU (--device cpu), so it cannot rot unnoticed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from arcdeploy import build
from arcdeploy.errors import ArcdeployError
from arcdeploy.package import load

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")


@pytest.fixture(scope="module")
def torch_pkg(r18_packages):
    return r18_packages("torch", "fp32")


@needs_no_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_gpu_precisions_say_what_is_missing(tmp_path, r18_export, precision):
    with pytest.raises(ArcdeployError, match=r"needs a CUDA GPU: this torch build has no CUDA"):
        build(r18_export.out_dir, tmp_path / "pkg", engine="torch", precision=precision)
    assert not (tmp_path / "pkg").exists()


@needs_no_gpu
def test_a_gpu_package_on_a_cpu_machine_says_so(tmp_path, torch_pkg):
    pkg = tmp_path / "gpu_pkg"
    shutil.copytree(torch_pkg, pkg)
    mf = pkg / "manifest.json"
    m = json.loads(mf.read_text())
    m.update(precision="fp16", device="cuda")
    mf.write_text(json.dumps(m))
    with pytest.raises(ArcdeployError, match=r"gpu_pkg .*needs a CUDA GPU"):
        load(pkg).infer(np.zeros((1, 112, 112, 3), np.uint8))


def test_torch_cpu_runtime_times_without_a_device_split(torch_pkg):
    from arcdeploy.bench import bench, format_report

    res = bench(torch_pkg, batches=[2], iterations=2, warmup=1)
    row = res.results[0]
    assert row.breakdown_ms is None and row.iterations == 2
    assert "host->device" not in format_report(res)
    info = load(torch_pkg).describe()
    assert info.device == "cpu" and info.executes == "f32"


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path, monkeypatch, r18_ckpt, r18_export):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # as the script runs
    import gpu_check

    monkeypatch.setenv("OUT", str(tmp_path))
    # the session's generated r18 and its export where the script keeps its own (it makes them only
    # when absent, as on a rerun): what runs here is its build, fidelity, timing and report
    (tmp_path / "work").mkdir()
    shutil.copyfile(r18_ckpt, tmp_path / "work" / "r18.pth")
    shutil.copytree(r18_export.out_dir, tmp_path / "work" / "r18_export")
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--archs",
            "r18",
            "--precisions",
            "fp32",
            "--batches",
            "1",
            "--seconds",
            "0.1",
            "--work",
            str(tmp_path / "work"),
        ]
    )
    assert code == 0
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    (row,) = doc["rows"]
    assert row["arch"] == "r18" and row["batch"] == 1 and row["img_s"] > 0
    assert row["cos_min"] >= 0.99999  # fp32 torch package against its own fp32 reference
    assert 4.5 < row["gflop_per_image"] < 6.0  # r18 at 112x112: about 5.2 GFLOP (counted, not copied)
