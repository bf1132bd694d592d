"""Issue 7: the one-command run, its report, step reuse and failure handling, and the demo."""

from __future__ import annotations

import json

import pytest

from arcdeploy.cli import main
from arcdeploy.demo import DemoConfig
from arcdeploy.run import run_pipeline

pytestmark = pytest.mark.slow  # runs whole pipelines

TINY_DEMO = DemoConfig(
    identities=6,
    templates_per_id=2,
    images_per_template=2,
    bin_pairs=30,
    calib_images=24,
    precisions=("fp32", "int8"),
    batches=(1, 4),
    iterations=3,
)


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory, mbf_ckpt):
    """fp32 builds; int8 without calibration images must fail and be reported (the small mbf network:
    what is tested is the run, not the network)."""
    out = tmp_path_factory.mktemp("run") / "out"
    first = run_pipeline(
        mbf_ckpt, out, engine="onnxruntime", precisions=["fp32", "int8"], batches=[2], iterations=3, log=lambda m: None
    )
    return out, first


def test_failing_step_is_reported_and_the_rest_runs(failing_run):
    out, result = failing_run
    status = {s.name: s.status for s in result.steps}
    assert status["export"] == "done"
    assert status["build onnxruntime-fp32"] == "done"
    assert status["build onnxruntime-int8"] == "failed"
    assert status["check onnxruntime-fp32"] == "done" and status["bench onnxruntime-fp32"] == "done"
    failed = [s for s in result.steps if s.status == "failed"]
    assert len(failed) == 1 and "calib" in failed[0].error.lower()
    md = (out / "report.md").read_text()
    assert "build onnxruntime-int8" in md and "failed" in md
    for section in ("## Fidelity", "## Speed", "## Steps"):
        assert section in md
    report = json.loads((out / "report.json").read_text())
    titles = [t["title"] for t in report["tables"]]
    assert any(t.startswith("Fidelity") for t in titles) and any(t.startswith("Speed") for t in titles)
    speed = next(t for t in report["tables"] if t["title"].startswith("Speed"))
    row = next(r for r in speed["rows"] if r[0] == "onnxruntime-fp32")
    assert row[1] == "fp32" and row[2] == 2 and row[3] > 0
    assert (out / "plots" / "throughput.png").stat().st_size > 1000


def test_rerun_reuses_finished_steps(failing_run, mbf_ckpt):
    out, _ = failing_run
    again = run_pipeline(
        mbf_ckpt, out, engine="onnxruntime", precisions=["fp32", "int8"], batches=[2], iterations=3, log=lambda m: None
    )
    status = {s.name: s.status for s in again.steps}
    assert status["export"] == "reused"
    assert status["build onnxruntime-fp32"] == "reused"
    assert status["bench onnxruntime-fp32"] == "reused"
    assert status["build onnxruntime-int8"] == "failed"  # a failed step is tried again, not reused


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    import arcdeploy.cli.demo as demo_cli

    monkeypatch.setattr("arcdeploy.demo.QUICK", TINY_DEMO)
    monkeypatch.setattr("arcdeploy.auto_precision.SPEED_SECONDS", 0.3)  # "choose precision": shorter rounds
    monkeypatch.setattr("arcdeploy.auto_precision.SPEED_ROUNDS", 2)  # and fewer (a user's: 3)
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "UNTRAINED" in captured.out and "arcdeploy run backbone.pth" in captured.out
    assert "report:" in captured.out
    md = (out / "report.md").read_text()
    for section in ("## Fidelity", "## Speed", "## Accuracy: IJBC", "## Accuracy: verification .bin", "UNTRAINED"):
        assert section in md, section
    report = json.loads((out / "report.json").read_text())
    assert all(s["status"] == "done" for s in report["steps"]), [s for s in report["steps"] if s["status"] != "done"]
    # the precision to deploy on this CPU, chosen by evidence (as --precision auto)
    choice = next(s for s in report["steps"] if s["name"] == "choose precision")["result"]
    assert choice["chosen"] in ("fp32", "int8") and {c["precision"] for c in choice["candidates"]} >= {"fp32", "int8"}
    assert f"## Precision for this CPU: {choice['chosen']}" in md and choice["why"] in md
    ijb = next(t for t in report["tables"] if t["title"].startswith("Accuracy: IJBC 1:1"))
    assert {r[0] for r in ijb["rows"]} == {"openvino-fp32", "openvino-int8"}
    # the demo's IJB set has 1:N lists: identification from the same step and features
    one_n = next(t for t in report["tables"] if t["title"].startswith("Accuracy: IJBC 1:N"))
    assert {(r[0], r[1]) for r in one_n["rows"]} == {
        (p, g) for p in ("openvino-fp32", "openvino-int8") for g in ("G1", "G2", "mean")
    }
    assert "## Accuracy: IJBC 1:N identification" in md
    for plot in ("roc.png", "tpir_fpir.png", "throughput.png", "cosine_hist.png"):
        assert (out / "plots" / plot).stat().st_size > 1000, plot
    # the untrained network's int8 recipe reaches the run's build (NNCF's own ranges, no fallback)
    int8 = json.loads((out / "packages" / "openvino-int8" / "manifest.json").read_text())["calibration"]
    assert int8["recipe"]["range_estimator"] == "nncf_default" and not int8["recipe"]["float_layers"]
    assert demo_cli  # the command module is importable


def test_cli_run_names_failed_steps_and_exits_nonzero(failing_run, mbf_ckpt, capsys):
    out, _ = failing_run
    code = main(
        [
            "run",
            str(mbf_ckpt),
            "-o",
            str(out),
            "--engine",
            "onnxruntime",
            "--precisions",
            "fp32,int8",
            "--batches",
            "2",
            "--iterations",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 3
    err_lines = [line for line in captured.err.splitlines() if "error:" in line]
    assert err_lines == [f"arcdeploy run: error: 1 step(s) failed: build onnxruntime-int8 (see {out / 'report.md'})"]
    assert "Speed: throughput" in captured.out and "report:" in captured.out


def test_cli_run_rejects_bad_batches(r18_ckpt, tmp_path, capsys):
    code = main(["run", str(r18_ckpt), "-o", str(tmp_path / "o"), "--batches", "0,a"])
    assert code == 2
    assert "--batch" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
