"""ONNX Runtime: CPU, or CUDA / TensorRT when onnxruntime-gpu provides them.

Builds fp32 (the exported ONNX as it is), int8 (static QDQ, made by NNCF's ONNX
backend or by ``onnxruntime.quantization.quantize_static``, both from the same
:class:`~arcdeploy.quantize.QuantRecipe`) and fp16 (needs a GPU provider).
Thread safety: ``InferenceSession.run`` may be called from several threads at once.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError, first_line
from ..manifest import CalibrationRecord, ExecutedRecord
from ..onnx_files import copy_onnx, data_entries, external_data_files, save_onnx
from ..quantize import QuantRecipe, float_nodes_onnx, quiet_quantizers, range_spread
from ..types import Device, Precision
from .base import BuildJob, Capabilities, Engine, GraphSession, Runtime, RuntimeInfo, TensorInfo
from .nncf_quant import nncf_quantize

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
QUANTIZERS = ("nncf", "onnxruntime")
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
}


def _ort():
    import onnxruntime as ort

    return ort


def gpu_providers() -> list[str]:
    available = _ort().get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available]


def _session(path: Path, threads: int | None, gpu: bool):
    ort = _ort()
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # failures reach the caller as exceptions (one-line errors); ONNX Runtime's own log lines would repeat
    # them on stderr, and its warnings (initializers listed as inputs, ...) describe the file, not the run
    so.log_severity_level = 4
    providers = (gpu_providers() if gpu else []) + ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), so, providers=providers)
    except Exception as exc:
        raise ArcdeployError(f"{path}: ONNX Runtime cannot load it ({ort_reason(exc, path)})") from None


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ")
_ORT_SOURCE = re.compile(r"^/?\S*\.(?:h|cc|cpp):\d+ (?:[^()]*\([^)]*\)(?: const)? )?")


def ort_reason(exc: BaseException, path) -> str:
    """What ONNX Runtime says is wrong, without what the message repeats: its error code, the file's
    path (the caller names the file), the C++ source location and function signature before the
    reason; then cut to one line."""
    text = " ".join(str(exc).split())
    text = _ORT_PREFIX.sub("", text)
    for form in {str(path), os.path.basename(str(path))}:
        text = text.replace(f"Load model from {form} failed:", "").replace(form, os.path.basename(str(path)))
    text = _ORT_SOURCE.sub("", text.strip())
    return first_line(text, limit=400)


def _info(args) -> list[TensorInfo]:
    return [TensorInfo(a.name, list(a.shape), _ORT_TYPES.get(a.type, a.type)) for a in args]


class OnnxRuntimeGraph(GraphSession):
    def __init__(self, path, threads: int | None = None, gpu: bool = False):
        self.path = Path(path)
        self.session = _session(self.path, threads, gpu)
        self.inputs = _info(self.session.get_inputs())
        self.outputs = _info(self.session.get_outputs())

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, feeds))


def open_graph(path, threads: int | None = None, gpu: bool = False, **_: Any) -> OnnxRuntimeGraph:
    return OnnxRuntimeGraph(path, threads, gpu)


class OnnxRuntimeRuntime(Runtime):
    engine_name = "onnxruntime"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        gpu = bool(options.get("gpu", True))
        if manifest.precision is Precision.FP16 and not gpu_providers():
            raise ArcdeployError(
                f"{self.package_dir}: an fp16 ONNX Runtime package needs a GPU "
                "(CUDAExecutionProvider from onnxruntime-gpu); none is available here"
            )
        self.session = _session(manifest.file(self.package_dir), self.threads, gpu)
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_dtype = np.float16 if first.type == "tensor(float16)" else None

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.input_dtype is not None and x.dtype == np.float32:
            x = x.astype(self.input_dtype)
        return np.asarray(self.session.run(None, {self.input_name: x})[0], dtype=np.float32)

    def describe(self) -> RuntimeInfo:
        providers = self.session.get_providers()
        gpu = providers[0] != "CPUExecutionProvider"
        return RuntimeInfo(
            engine="onnxruntime",
            device=Device.GPU if gpu else Device.CPU,
            precision=self.manifest.precision,
            executes=self.manifest.precision,
            threads=self.threads or "default (one per physical core)",
            version=_ort().__version__,
            details={"providers": providers},
        )


# ------------------------------------------------------------------ building


def _check(precision: Precision) -> None:
    if precision is Precision.FP16 and not gpu_providers():
        raise ArcdeployError(
            "precision fp16 needs a GPU for onnxruntime (CUDAExecutionProvider from "
            "onnxruntime-gpu; none here); use --engine openvino"
        )


def build(job: BuildJob) -> None:
    import onnx

    target = job.out_dir / "model.onnx"
    if job.precision is Precision.INT8:
        assert job.recipe is not None and job.calib_inputs is not None
        quantizer = job.options.get("ort_quantizer", "nncf")
        if quantizer not in QUANTIZERS:
            raise ArcdeployError(f"unknown ort_quantizer {quantizer!r}; choose {' or '.join(QUANTIZERS)}")
        quantize = _quantize_nncf if quantizer == "nncf" else _quantize_ort
        job.manifest.calibration = quantize(job.onnx_path, target, job.calib_inputs, job.input.name, job.recipe)
    elif job.precision is Precision.FP16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        save_onnx(convert_float_to_float16(onnx.load(str(job.onnx_path)), keep_io_types=True), target)
        job.manifest.device = Device.GPU
    else:
        copy_onnx(job.onnx_path, target)
    if job.fold_preprocessing:
        model = fold_preprocessing(onnx.load(str(target)), job.input)
        onnx.checker.check_model(model)
        save_onnx(model, target)
    # the weights' files too, when a large model keeps them beside it (the fingerprint covers them)
    job.manifest.files = {"model": "model.onnx", **data_entries("model", external_data_files(target))}
    job.manifest.executed = ExecutedRecord(
        inference_precision=job.precision if job.precision is not Precision.INT8 else "int8 (QDQ) + fp32",
        note="ONNX Runtime runs what the graph says: no precision hint",
    )


def fold_preprocessing(model, spec):
    """Prepend uint8 NHWC -> float NCHW and the spec's normalisation to an ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    old = graph.input[0]
    name = old.name
    raw = f"{name}_uint8_nhwc"
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    h, w = spec.size
    new_input = helper.make_tensor_value_info(raw, TensorProto.UINT8, [dims[0], h, w, 3])
    mean = numpy_helper.from_array(
        np.asarray(spec.mean, np.float32).reshape(-1, 1, 1)
        if isinstance(spec.mean, tuple)
        else np.array(spec.mean, np.float32),
        f"{name}_mean",
    )
    std = numpy_helper.from_array(
        np.asarray(spec.std, np.float32).reshape(-1, 1, 1)
        if isinstance(spec.std, tuple)
        else np.array(spec.std, np.float32),
        f"{name}_std",
    )
    nodes = [
        helper.make_node("Transpose", [raw], [f"{name}_nchw"], perm=[0, 3, 1, 2], name="pre/Transpose"),
        helper.make_node("Cast", [f"{name}_nchw"], [f"{name}_f32"], to=TensorProto.FLOAT, name="pre/Cast"),
    ]
    src = f"{name}_f32"
    if spec.color == "BGR":
        # the package takes RGB crops; a BGR model gets its channels swapped in the graph
        idx = numpy_helper.from_array(np.array([2, 1, 0], np.int64), f"{name}_bgr_index")
        graph.initializer.append(idx)
        nodes.append(helper.make_node("Gather", [src, idx.name], [f"{name}_bgr"], axis=1, name="pre/BGR"))
        src = f"{name}_bgr"
    if spec.normalize_in_graph:
        nodes.append(helper.make_node("Identity", [src], [name], name="pre/Identity"))
    else:
        nodes += [
            helper.make_node("Sub", [src, mean.name], [f"{name}_centered"], name="pre/Sub"),
            helper.make_node("Div", [f"{name}_centered", std.name], [name], name="pre/Div"),
        ]
        graph.initializer.extend([mean, std])
    body = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + body)
    graph.input.remove(old)
    graph.input.insert(0, new_input)
    return model


def _quantize_nncf(src: Path, target: Path, x: np.ndarray, input_name: str, recipe: QuantRecipe) -> CalibrationRecord:
    """NNCF's ONNX backend -> a QDQ model ONNX Runtime runs (the OpenVINO build's recipe)."""
    import onnx

    model = onnx.load(str(src))
    spreads = input_spreads(src, x[:SPREAD_SAMPLES], input_name) if "spread" in recipe.keep_float else None
    kept = float_nodes_onnx(model, recipe, spreads)
    q = nncf_quantize(model, [{input_name: x[i : i + 1]} for i in range(len(x))], recipe, kept.names())
    onnx.save(q, str(target))
    return recipe.manifest_entry("NNCF post-training quantization, ONNX backend -> QDQ", kept, len(x))


def _quantize_ort(src: Path, target: Path, x: np.ndarray, input_name: str, recipe: QuantRecipe) -> CalibrationRecord:
    """onnxruntime.quantization.quantize_static, QDQ format."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(range(len(x)))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {input_name: x[i : i + 1]}

    with tempfile.TemporaryDirectory(prefix="arcdeploy-ortq-") as work:
        pre = Path(work) / "pre.onnx"
        with quiet_quantizers():
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        spreads = input_spreads(pre, x[:SPREAD_SAMPLES], input_name) if "spread" in recipe.keep_float else None
        kept = float_nodes_onnx(onnx.load(str(pre), load_external_data=False), recipe, spreads)
        with quiet_quantizers():
            quantize_static(str(pre), str(target), Reader(), **ort_quantization_kwargs(recipe, kept.names()))
    return recipe.manifest_entry("onnxruntime quantize_static -> QDQ", kept, len(x))


SPREAD_SAMPLES = 64  # calibration images the input channel spread is measured on


def input_spreads(onnx_path: Path, x: np.ndarray, input_name: str, batch: int = 16) -> dict[str, float]:
    """The per-channel range spread of every Conv's input (:func:`arcdeploy.quantize.range_spread`),
    measured by running the float model with those tensors as extra outputs."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    names = list(dict.fromkeys(n.input[0] for n in convs))
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names if t not in have)
    session = _session_from_bytes(model.SerializeToString())
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    for s in range(0, len(x), batch):
        outs = session.run(names, {input_name: x[s : s + batch]})
        for t, a in zip(names, outs):
            mn, mx = a.min(axis=(0, 2, 3)), a.max(axis=(0, 2, 3))
            lo[t] = np.minimum(lo[t], mn) if t in lo else mn
            hi[t] = np.maximum(hi[t], mx) if t in hi else mx
    return {n.name: range_spread(hi[n.input[0]] - lo[n.input[0]]) for n in convs}


def _session_from_bytes(data: bytes, threads: int | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


class LayerReverter:
    """A QDQ int8 model with chosen layers put back in float (their input's QuantizeLinear /
    DequantizeLinear pair bypassed, their fp32 weights and bias restored), for ranking layers
    by what int8 costs them."""

    WEIGHTED = ("Conv", "Gemm", "MatMul")

    def __init__(self, quantized_path: Path, float_path: Path, threads: int | None = None):
        import onnx

        self.quantized = onnx.load(str(quantized_path))
        self.input_name = self.quantized.graph.input[0].name  # the package's input (folded or not)
        float_model = onnx.load(str(float_path))
        self.float_nodes = {n.name: n for n in float_model.graph.node if n.op_type in self.WEIGHTED}
        self.float_inits = {i.name: i for i in float_model.graph.initializer}
        self.threads = threads

    def layers(self) -> list[str]:
        """Weighted nodes fed by a DequantizeLinear, and residual Adds with a quantized input."""
        producers = {o: n for n in self.quantized.graph.node for o in n.output}

        def dequantized(names) -> bool:
            return any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in names)

        return [
            n.name
            for n in self.quantized.graph.node
            if (n.op_type in self.WEIGHTED and n.name in self.float_nodes and dequantized(n.input[:2]))
            or (n.op_type == "Add" and dequantized(n.input))
        ]

    def embed(self, names: list[str], x: np.ndarray, batch: int = 32) -> np.ndarray:
        run = self.runner(names)
        return np.concatenate([run(x[s : s + batch])[0] for s in range(0, len(x), batch)]).astype(np.float32)

    def runner(self, names: list[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """The model with ``names`` back in float, in a session: inputs -> every output."""
        import onnx

        model = onnx.ModelProto()
        model.CopyFrom(self.quantized)
        producers = {o: n for n in model.graph.node for o in n.output}
        by_name = {n.name: n for n in model.graph.node}
        added: set[str] = set()
        for name in names:
            node = by_name[name]
            for k in range(len(node.input) if node.op_type == "Add" else 1):  # bypass Q -> DQ on the inputs
                dq = producers.get(node.input[k])
                if dq is not None and dq.op_type == "DequantizeLinear":
                    q = producers.get(dq.input[0])
                    if q is not None and q.op_type == "QuantizeLinear":
                        node.input[k] = q.input[0]
            if node.op_type == "Add":
                continue
            ref = self.float_nodes[name]
            for k in range(1, min(len(node.input), len(ref.input))):
                init = self.float_inits.get(ref.input[k])
                if init is None:
                    continue
                restored = f"arcdeploy_fp32/{name}/{k}"
                if restored not in added:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(init)
                    copy.name = restored
                    model.graph.initializer.append(copy)
                    added.add(restored)
                node.input[k] = restored
        session = _session_from_bytes(model.SerializeToString(), self.threads)
        return lambda x: list(session.run(None, {self.input_name: x}))


def reverter(job: BuildJob) -> LayerReverter:
    return LayerReverter(job.out_dir / "model.onnx", job.onnx_path, job.manifest.threads)


def ort_quantization_kwargs(recipe: QuantRecipe, excluded: list[str]) -> dict:
    """The recipe as keyword arguments for ``onnxruntime.quantization.quantize_static`` (QDQ): uint8
    activations, int8 weights, MinMax ranges (max_quantile, nncf_default, minmax, mean_minmax; the other
    estimators map to Percentile)."""
    from onnxruntime import quantization as q

    minmax = recipe.range_estimator in ("max_quantile", "nncf_default", "minmax", "mean_minmax")
    return {
        "quant_format": q.QuantFormat.QDQ,
        "activation_type": q.QuantType.QUInt8,
        "weight_type": q.QuantType.QInt8,
        "per_channel": recipe.per_channel_weights,
        "reduce_range": recipe.weight_bits == 7,
        "calibrate_method": q.CalibrationMethod.MinMax if minmax else q.CalibrationMethod.Percentile,
        "op_types_to_quantize": list(recipe.ort_op_types),
        "nodes_to_exclude": list(excluded),
        "extra_options": {"ActivationSymmetric": recipe.symmetric_activations, "WeightSymmetric": True},
    }


def _version() -> str:
    return str(_ort().__version__)


ENGINE = Engine(
    name="onnxruntime",
    requirement="onnxruntime",
    module="onnxruntime",
    capabilities=Capabilities(
        precisions=(Precision.FP32, Precision.FP16, Precision.INT8),
        gpu_only=(Precision.FP16,),
        devices=(Device.CPU, Device.GPU),
        async_requests=False,
        reports_executed=False,
        folds_preprocessing=True,
        static_batch=False,
        quantizer="NNCF (ONNX backend) or onnxruntime.quantization",
    ),
    build=build,
    runtime=OnnxRuntimeRuntime,
    open_graph=open_graph,
    check=_check,
    describe_library=_version,
    reverter=reverter,
)
