"""The typed pieces the stages pass each other: precision and device enums, the manifest's records,
build and run options, the crop runner, the source registry and the interleaved timing loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from arcdeploy.engines.base import interleaved_rates
from arcdeploy.engines.runner import CropRunner
from arcdeploy.errors import ArcdeployError
from arcdeploy.manifest import (
    CalibrationRecord,
    CosineStats,
    ExecutedRecord,
    FidelityRecord,
    HostRecord,
    InputSpec,
    PackageManifest,
    SourceRecord,
)
from arcdeploy.options import BuildOptions, RunOptions
from arcdeploy.sources.registry import open_source, source_kind
from arcdeploy.types import Device, FloatLayerPrecision, Precision


def test_precision_parses_the_seed_aliases_and_stays_a_string():
    assert Precision.parse("qint8_mixed_float16") is Precision.INT8
    assert Precision.parse("force_float16") is Precision.FP16 and Precision.parse("bf16") is Precision.BF16
    assert Precision.INT8 == "int8" and f"{Precision.FP32}" == "fp32"
    assert json.dumps({"p": Precision.INT8, "d": Device.CUDA, "f": FloatLayerPrecision.AUTO}) == (
        '{"p": "int8", "d": "cuda", "f": "auto"}'
    )
    with pytest.raises(ArcdeployError, match="unknown precision 'int4'"):
        Precision.parse("int4")


def _manifest() -> PackageManifest:
    return PackageManifest(
        engine="openvino",
        precision=Precision.INT8,
        arch="r18",
        files={"model": "model.xml"},
        device=Device.CPU,
        calibration=CalibrationRecord(
            method="NNCF",
            recipe={"weight_bits": 8},
            count=300,
            kept_float=["conv0"],
            kept_float_why={"stem": "why"},
            seven_bit_weights=False,
            float_layers_execute=FloatLayerPrecision.F32,
            source="faces/",
        ),
        fidelity=FidelityRecord(
            cosine=CosineStats(0.995, 0.98, 0.981, 1.0, 64),
            reference="pytorch fp32",
            images="generated",
            images_source="synthetic",
            engine="openvino",
            precision=Precision.INT8,
            floor={"mean": 0.99, "min": 0.97},
            passed=True,
            below_floor=[],
        ),
        executed=ExecutedRecord("f32", {"Convolution": {"u8": 19, "f32": 1}}),
        engine_config={"performance_hint": "LATENCY"},
        source=SourceRecord(kind="checkpoint", path="/x/backbone.pth", sha256="ab", notes=["unwrapped"]),
        host=HostRecord(cpu="test cpu", flags=["avx2"]),
        versions={"python": "3.11"},
    )


def test_manifest_records_round_trip_through_json():
    m = _manifest()
    data = json.loads(json.dumps(m.to_json()))
    assert "skipped" not in data["calibration"] and data["calibration"]["source"] == "faces/"
    again = PackageManifest.from_json(data, "pkg/manifest.json")
    assert again == m
    assert again.precision is Precision.INT8 and again.device is Device.CPU
    assert again.calibration.float_layers_execute is FloatLayerPrecision.F32


@pytest.mark.parametrize(
    "path,value,message",
    [
        (("calibration", "count"), "300", "'calibration.count' must be int"),
        (("fidelity", "cosine", "n"), 6.5, "'fidelity.cosine.n' must be int"),
        (("device",), "TPU", "'device' is 'TPU'; expected one of CPU, GPU, cuda"),
        (("source", "kind"), "zip", "'source.kind' is 'zip'"),
        (("engine_config", "performance_hint"), 3, "'engine_config' must map names to strings"),
    ],
)
def test_manifest_records_refuse_wrong_types_naming_file_and_key(path, value, message):
    data = json.loads(json.dumps(_manifest().to_json()))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ArcdeployError, match=f"pkg/manifest.json: {message}"):
        PackageManifest.from_json(data, "pkg/manifest.json")


def test_build_options_keep_the_asked_alias_and_pass_engine_options_on():
    opts = BuildOptions.from_kwargs(precision="force_float32", engine="onnxruntime", ort_quantizer="onnxruntime")
    assert opts.precision is Precision.FP32 and opts.requested_precision == "force_float32"
    assert opts.engine_options == {"ort_quantizer": "onnxruntime"}
    with pytest.raises(ArcdeployError, match="--batch must be at least 1"):
        BuildOptions(batch=0).validate()
    with pytest.raises(ArcdeployError, match="--max-cosine-drop must be between 0 and 1"):
        BuildOptions(max_cosine_drop=1.5).validate()
    run = RunOptions.from_kwargs(engine="torch", precisions=["fp32", "qint8_mixed_float16"], batches=[2])
    assert run.build.engine == "torch" and run.precisions == (Precision.FP32, Precision.INT8) and run.batches == (2,)
    with pytest.raises(TypeError, match="colour"):
        RunOptions.from_kwargs(colour="red")


def test_crop_runner_pads_a_fixed_batch_and_drops_the_padding():
    seen: list[int] = []

    def model(x: np.ndarray) -> np.ndarray:
        seen.append(len(x))
        return x.reshape(len(x), -1)[:, :4].astype(np.float32)

    faces = np.random.default_rng(0).integers(0, 256, (7, 112, 112, 3), dtype=np.uint8)
    spec = InputSpec()
    fixed = CropRunner(model, spec, batch=3)(faces)
    assert seen == [3, 3, 3]  # 7 crops: two full batches and one padded with copies of the last crop
    np.testing.assert_array_equal(fixed, model(spec.to_model_input(faces)))
    seen.clear()
    CropRunner(model, spec, max_batch=4)(faces)
    assert seen == [4, 3]
    seen.clear()
    CropRunner(model, spec)(faces)
    assert seen == [7]


def test_source_registry_picks_the_kind_and_refuses_foreign_options(tmp_path):
    assert source_kind(tmp_path / "w600k.ONNX") == "onnx"
    assert source_kind(tmp_path / "backbone.pth") == "checkpoint"
    with pytest.raises(ArcdeployError, match="--input-mean, --bgr: only for an ONNX source"):
        open_source(tmp_path / "backbone.pth", input_mean=127.5, bgr=True)
    assert open_source(tmp_path / "m.onnx", input_std=60).overrides == {"input_std": 60.0}


def test_interleaved_rates_take_turns_and_count_items():
    order: list[str] = []
    calls = {k: (lambda k=k: order.append(k)) for k in ("a", "b", "c")}
    rates = interleaved_rates(calls, {"a": 1, "b": 2, "c": 3}, rounds=3, seconds=0.0, warmup=0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # one call each per round, rotating
    assert all(len(r) == 3 and all(v > 0 for v in r) for r in rates.values())
