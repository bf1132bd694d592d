"""arcdeploy bench: the JSON contract (SPEC section 9), sane values, argument errors.

Checks correctness of what is reported, never speed (timings on shared CI cores vary).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from arcdeploy.bench import bench, format_report, latency_summary, parse_batches
from arcdeploy.errors import ArcdeployError


def _check_result_row(row, batch):
    assert row["batch"] == batch
    assert row["throughput"] > 0
    lm = row["latency_ms"]
    assert lm["mean"] > 0
    assert 0 < lm["p50"] <= lm["p90"] <= lm["p95"] <= lm["p99"]
    assert lm["min"] <= lm["mean"] <= lm["max"]
    # throughput and latency describe the same runs: images / (sum of latencies) is close to it (sync mode)
    implied = batch * row["iterations"] / (lm["mean"] * row["iterations"] / 1e3)
    assert implied == pytest.approx(row["throughput"], rel=0.25)


def test_bench_function_fields(r18_ort_fp32_pkg):
    res = bench(r18_ort_fp32_pkg, batches=(1, 3), iterations=4, warmup=1).to_json()
    assert [r["batch"] for r in res["results"]] == [1, 3]
    for row, b in zip(res["results"], (1, 3)):
        _check_result_row(row, b)
        assert row["iterations"] == 4
        assert row["images"] == 4 * b
    assert res["engine"] == "onnxruntime" and res["precision"] == "fp32" and res["arch"] == "r18"
    assert res["load_ms"] > 0 and res["first_inference_ms"] > 0
    # the process holds at least the r18 weights (~90 MB) at its peak
    assert res["peak_rss_mb"] >= 90
    assert res["machine"]["cpu"] and res["machine"]["logical_cpus"] >= 1
    assert res["streams"] == 1
    text = format_report(res)
    assert "p99" in text and "onnxruntime" in text


def test_bench_throughput_mode_without_async_says_so(r18_ort_fp32_pkg):
    res = bench(r18_ort_fp32_pkg, batches=[2], iterations=2, warmup=0, mode="throughput", threads=1).to_json()
    assert res["streams_note"] == "1 (engine has no async)"
    assert res["threads"] == 1
    _check_result_row(res["results"][0], 2)


def test_bench_duration_runs_until_time_is_up(r18_ort_fp32_pkg):
    res = bench(r18_ort_fp32_pkg, batches=[1], duration=0.3, warmup=0).to_json()
    row = res["results"][0]
    assert row["wall_s"] >= 0.3
    assert row["iterations"] >= 1


def test_parse_batches_and_errors():
    assert parse_batches("1,8,32") == [1, 8, 32]
    assert parse_batches(" 4 ") == [4]
    for bad in ("0", "a,b", "1,,2", "-1", ""):
        with pytest.raises(ArcdeployError):
            parse_batches(bad)


def test_latency_summary_percentiles_ordered():
    s = latency_summary([5.0, 1.0, 3.0, 2.0, 4.0, 100.0])
    assert s["p50"] == pytest.approx(3.5)
    assert s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"] == 100.0
    assert s["mean"] == pytest.approx(115 / 6)


def test_bench_rejects_iterations_and_duration(r18_ort_fp32_pkg):
    with pytest.raises(ArcdeployError, match="not both"):
        bench(r18_ort_fp32_pkg, batches=[1], iterations=2, duration=1.0)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "arcdeploy", "bench", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_writes_json(r18_ort_fp32_pkg, tmp_path):
    out = tmp_path / "sub" / "bench.json"
    proc = _cli(r18_ort_fp32_pkg, "--batch", "1,2", "--iterations", "3", "--warmup", "1", "--json", out)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["results"]] == [1, 2]
    for row, b in zip(data["results"], (1, 2)):
        _check_result_row(row, b)
    assert "throughput" in proc.stdout and "p50" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch", "0"], "batch sizes must be >= 1"),
        (["--batch", "a,b"], "not an integer"),
        (["--iterations", "2", "--duration", "1"], "not both"),
        (["--iterations", "0"], "--iterations"),
    ],
)
@pytest.mark.slow
def test_cli_argument_errors(r18_ort_fp32_pkg, args, message):
    proc = _cli(r18_ort_fp32_pkg, *args)
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert message in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_cli_missing_package(tmp_path):
    missing = tmp_path / "nope"
    proc = _cli(missing, "--batch", "1", "--iterations", "1")
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err


def test_bench_e2e_times_image_files(r18_ort_fp32_pkg, faces16, tmp_path):
    import cv2

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, face in enumerate(faces16[:5]):
        assert cv2.imwrite(str(folder / f"{i}.png"), face[:, :, ::-1])
    res = bench(r18_ort_fp32_pkg, batches=[2], iterations=1, warmup=0, e2e=folder).to_json()
    e2e = res["e2e"]
    assert e2e["images"] == 5 and e2e["failed"] == 0 and e2e["batch"] == 2
    assert e2e["throughput"] > 0 and e2e["ms_per_image"] == pytest.approx(1e3 * e2e["wall_s"] / 5)


@pytest.mark.slow
def test_cli_e2e_missing_folder(r18_ort_fp32_pkg, tmp_path):
    proc = _cli(r18_ort_fp32_pkg, "--batch", "1", "--iterations", "1", "--e2e", tmp_path / "no_images")
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "no_images" in err[0]


@pytest.fixture(scope="module")
def r18_ov_fp32_pkg(r18_packages):
    return r18_packages("openvino", "fp32")


@pytest.mark.slow
def test_bench_openvino_throughput_mode_uses_async_requests(r18_ov_fp32_pkg):
    res = bench(r18_ov_fp32_pkg, batches=[2], iterations=4, warmup=1, mode="throughput", streams=2).to_json()
    assert res["streams"] == 2 and "async" in res["streams_note"]
    row = res["results"][0]
    assert row["iterations"] == 4 and row["how"].startswith("OpenVINO AsyncInferQueue")
    lm = row["latency_ms"]
    assert row["throughput"] > 0 and 0 < lm["p50"] <= lm["p90"] <= lm["p95"] <= lm["p99"]
    assert res["engine_info"]["performance_hint"].upper().endswith("THROUGHPUT")
