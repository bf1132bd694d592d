"""OpenVINO (CPU): IR packages compiled with the manifest's precision hint and threads.

Builds fp32, bf16 / fp16 (through ``INFERENCE_PRECISION_HINT``; the IR keeps f16
weights for fp16) and int8 (NNCF post-training quantization from the
:class:`~arcdeploy.quantize.QuantRecipe`). What the CPU plugin really executes is
read back from the compiled model (each compute layer's ``runtimePrecision``) and
recorded: a bf16 hint on a CPU without bf16 runs f32, and on a bf16-capable CPU the
plugin runs every float layer in bf16 unless told otherwise, the float layers of an
int8 model included; the recipe says which (``float_precision``).

Thread safety: each call takes an infer request from a pool (one per concurrent
caller) and copies the output before handing the request back. ``infer_many`` and
the throughput benchmark keep several requests in flight with ``AsyncInferQueue``.
"""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError, first_line
from ..machine import usable_cpus
from ..manifest import ExecutedRecord
from ..quantize import DEPTHWISE_MAX_GROUP_INPUTS, FloatScope, QuantRecipe, range_spread, spread_layers
from ..types import Device, FloatLayerPrecision, Precision
from .base import BuildJob, Capabilities, Engine, GraphSession, Runtime, RuntimeInfo, StopRule, TensorInfo
from .nncf_quant import nncf_quantize

# layer types whose runtime precision says what the heavy math runs in
COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Gemm", "GroupConvolution", "Deconvolution")
# OpenVINO's element types for the precision hint
HINTS = {Precision.FP32: "f32", Precision.FP16: "f16", Precision.BF16: "bf16"}
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")


@functools.lru_cache(maxsize=1)
def _ov():
    import openvino as ov

    return ov


@functools.lru_cache(maxsize=1)
def core():
    return _ov().Core()


def _type_name(t) -> str:
    # openvino.Type -> "f32", "bf16", "f16"
    name = getattr(t, "get_type_name", None)
    return name() if name else str(t)


def executed_precisions(compiled_model) -> ExecutedRecord:
    """The inference precision and the runtime precision of each compute layer kind
    ({"Convolution": {"u8": 21}, ...}) of a compiled model."""
    layers: dict[str, Counter] = {}
    for op in compiled_model.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" not in info or "runtimePrecision" not in info:
            continue
        kind = info["layerType"].astype(str)
        if kind in COMPUTE_LAYERS:
            layers.setdefault(kind, Counter())[info["runtimePrecision"].astype(str)] += 1
    return ExecutedRecord(
        inference_precision=_type_name(compiled_model.get_property("INFERENCE_PRECISION_HINT")),
        layers={k: dict(sorted(v.items())) for k, v in sorted(layers.items())},
    )


def compile_config(
    engine_config: dict, threads: int | None, performance_hint: str | None = None, num_requests: int | None = None
) -> dict:
    hint = (performance_hint or engine_config.get("performance_hint") or "LATENCY").upper()
    if hint not in PERFORMANCE_HINTS:
        raise ArcdeployError(f"performance hint {hint!r}: choose LATENCY or THROUGHPUT")
    config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
    if engine_config.get("inference_precision"):
        config["INFERENCE_PRECISION_HINT"] = engine_config["inference_precision"]
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if num_requests:
        config["PERFORMANCE_HINT_NUM_REQUESTS"] = int(num_requests)
    return config


def _compile(model_or_path, config: dict, what: str):
    try:
        return core().compile_model(model_or_path, Device.CPU.value, config)
    except Exception as exc:
        raise ArcdeployError(f"{what}: OpenVINO cannot compile it ({first_line(exc)})") from None


def _read(path: Path):
    try:
        return core().read_model(str(path))
    except Exception as exc:
        reason = first_line(exc)
        weights = Path(path).with_suffix(".bin")
        if Path(path).suffix == ".xml" and ("weights" in reason.lower() or ".bin" in reason) and weights.exists():
            # OpenVINO blames the .xml for what is wrong in the weights file beside it
            size = weights.stat().st_size
            raise ArcdeployError(
                f"{weights}: OpenVINO cannot read the weights ({reason}; {size} bytes: truncated or from "
                f"another build of {Path(path).name}?)"
            ) from None
        raise ArcdeployError(f"{path}: OpenVINO cannot read it ({reason})") from None


# OpenVINO's Python module (pybind11) sets up its numpy glue on the first inference of the process,
# in a C++ static whose set-up waits for the GIL while another thread, holding the GIL, waits for that
# set-up: two threads making their first inference at once can hang for ever (seen with the embed
# pipeline's preparation workers each detecting its first photo while the main thread recognised;
# reproduced by 6 threads starting together, 7 hangs in 60 processes). So the process's first
# inference runs alone; once one has finished, calls run freely.
_FIRST_INFERENCE = threading.Lock()
_first_inference_done = False


class _RequestPool:
    """Infer requests handed to one caller at a time; a new one is made when all are busy."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.free: queue.LifoQueue = queue.LifoQueue()

    @contextlib.contextmanager
    def request(self):
        global _first_inference_done
        try:
            req = self.free.get_nowait()
        except queue.Empty:
            req = self.compiled.create_infer_request()
        try:
            if _first_inference_done:
                yield req
            else:
                with _FIRST_INFERENCE:
                    yield req
                    _first_inference_done = True
        finally:
            self.free.put(req)


class OpenVINORuntime(Runtime):
    engine_name = "openvino"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        self.config = compile_config(
            manifest.engine_config, self.threads, options.get("performance_hint"), options.get("num_requests")
        )
        path = manifest.file(self.package_dir)
        if "weights" in manifest.files:
            manifest.file(self.package_dir, "weights")  # refused when it points outside the package
        self.compiled = _compile(_read(path), self.config, str(path))
        self._pool = _RequestPool(self.compiled)
        self._queue_lock = threading.Lock()
        self._queue = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self._pool.request() as req:
            req.infer({0: x})
            return np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _async_queue(self, jobs: int):
        if self._queue is None or len(self._queue) != jobs:
            self._queue = _ov().AsyncInferQueue(self.compiled, jobs)
        return self._queue

    def infer_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """The batches on ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` requests at once, results in order."""
        results: list = [None] * len(batches)
        with self._queue_lock:
            q = self._async_queue(self.optimal_in_flight())

            def done(request, index):
                results[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

            q.set_callback(done)
            for i, b in enumerate(batches):
                q.start_async({0: b}, userdata=i)
            q.wait_all()
        return results

    @classmethod
    def options_for(cls, throughput: bool, requests: int | None = None) -> dict[str, Any]:
        """One CPU stream per request for a throughput run, as benchmark_app -hint throughput compiles it."""
        options: dict[str, Any] = {"performance_hint": "THROUGHPUT" if throughput else "LATENCY"}
        if throughput and requests is not None:
            options["num_requests"] = int(requests)
        return options

    def in_flight_how(self) -> str:
        return "OpenVINO AsyncInferQueue"

    def optimal_in_flight(self) -> int:
        with contextlib.suppress(Exception):
            return max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return 1

    def timed_runs(self, x: np.ndarray, in_flight: int, warmup: int, stop: StopRule) -> tuple[list[float], float]:
        """Several requests in flight through ``AsyncInferQueue``; each request's latency runs
        from its start to its completion callback."""
        if in_flight <= 1:
            return super().timed_runs(x, in_flight, warmup, stop)
        lat: list[float] = []
        with self._queue_lock:
            q = self._async_queue(in_flight)
            q.set_callback(lambda request, started: lat.append((time.perf_counter() - started) * 1e3))
            inputs = {0: x}
            for _ in range(max(warmup, 1) * in_flight):
                q.start_async(inputs, time.perf_counter())
            q.wait_all()
            lat.clear()
            started = 0
            t0 = time.perf_counter()
            while not stop.done(started, t0):
                q.get_idle_request_id()  # wait for a free request, so its latency excludes queueing
                q.start_async(inputs, time.perf_counter())
                started += 1
            q.wait_all()
        return list(lat), time.perf_counter() - t0

    def layer_profile(self, x: np.ndarray, iterations: int = 2) -> dict:
        """OpenVINO's performance counters (the model compiled once more with PERF_COUNT)."""
        from collections import defaultdict

        config = {**self.config, "PERF_COUNT": True}
        cm = _compile(_read(self.manifest.file(self.package_dir)), config, str(self.package_dir))
        req = cm.create_infer_request()
        req.infer({0: x})  # warm-up: the first run includes one-time work
        by_type: dict[str, float] = defaultdict(float)
        by_exec: dict[str, float] = defaultdict(float)
        total = 0.0
        for _ in range(iterations):
            req.infer({0: x})
            for info in req.get_profiling_info():
                if str(info.status).endswith("NOT_RUN"):
                    continue
                ms = info.real_time.total_seconds() * 1e3 / iterations
                by_type[info.node_type] += ms
                by_exec[f"{info.node_type} [{info.exec_type}]"] += ms
                total += ms
        return {
            "total_ms": total,
            "by_type": dict(sorted(by_type.items(), key=lambda kv: -kv[1])),
            "by_exec": dict(sorted(by_exec.items(), key=lambda kv: -kv[1])),
        }

    def describe(self) -> RuntimeInfo:
        cm = self.compiled
        executed = executed_precisions(cm)
        return RuntimeInfo(
            engine="openvino",
            device=Device.CPU,
            precision=self.manifest.precision,
            executes=executed.inference_precision,
            threads=int(cm.get_property("INFERENCE_NUM_THREADS")),
            version=_ov().get_version(),
            streams=int(cm.get_property("NUM_STREAMS")),
            infer_requests=self.optimal_in_flight(),
            details={
                "performance_hint": str(cm.get_property("PERFORMANCE_HINT")).split(".")[-1],
                "requested_precision_hint": self.config.get("INFERENCE_PRECISION_HINT"),
                "executed": executed.to_json(),
            },
        )


def graph_config(threads: int | None, precision_hint: str | None) -> dict[str, Any]:
    """How a graph session is compiled: a package's latency settings (:func:`compile_config`) and,
    with ``threads`` per call, one CPU stream per ``threads`` cores. A stream runs one request at a
    time, so the several callers of one session (the photo pipeline's preparation workers sharing a
    detector) would otherwise take turns on one core, where ONNX Runtime runs them side by side.
    Measured (benchmarks/bench_photos.py's SCRFD-500M int8 package, 3 preparation workers, 2 cores):
    one stream 48 LFW-size photos/s on 1.34 cores busy, a stream per core 74 on 1.97; 12 MP photos
    32 -> 38-40 photos/s. One caller runs as before, on one stream of ``threads`` threads."""
    if not threads:
        return compile_config({"inference_precision": precision_hint}, None)
    streams = max(1, usable_cpus() // int(threads))
    return {**compile_config({"inference_precision": precision_hint}, int(threads) * streams), "NUM_STREAMS": streams}


class OpenVINOGraph(GraphSession):
    """Any ONNX / IR file compiled for the CPU (:func:`graph_config`); a request per concurrent caller."""

    def __init__(self, path, threads: int | None = None, precision_hint: str | None = "f32", **_: Any):
        self.path = Path(path)
        model = _read(self.path)
        config = graph_config(threads, precision_hint)
        self.compiled = _compile(model, config, str(self.path))
        self._pool = _RequestPool(self.compiled)
        self.inputs = [
            TensorInfo(p.get_any_name(), _shape(p.get_partial_shape()), _type_name(p.get_element_type()))
            for p in self.compiled.inputs
        ]
        self.outputs = [
            TensorInfo(p.get_any_name(), _shape(p.get_partial_shape()), _type_name(p.get_element_type()))
            for p in self.compiled.outputs
        ]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with self._pool.request() as req:
            req.infer(feeds)
            return [np.array(req.get_output_tensor(i).data, copy=True) for i in range(len(self.outputs))]


def _shape(ps) -> list[Any]:
    return [d.get_length() if d.is_static else None for d in ps]


def open_graph(path, threads: int | None = None, **options: Any) -> OpenVINOGraph:
    return OpenVINOGraph(path, threads, **options)


# ------------------------------------------------------------------ building


WEIGHTED = ("Convolution", "GroupConvolution", "MatMul")
SPREAD_SAMPLES = 64  # calibration images the input channel spread is measured on


def convert(onnx_path: Path):
    """The exported ONNX as an OpenVINO model to build from. ``convert_model`` folds the constant
    subgraphs of a dynamic-batch export (read_model leaves each convolution's bias behind a
    ShapeOf / Reshape chain, where NNCF's bias correction does not find it and silently does nothing)."""
    try:
        return _ov().convert_model(str(onnx_path))
    except Exception as exc:
        raise ArcdeployError(f"{onnx_path}: OpenVINO cannot convert it ({first_line(exc)})") from None


# OpenVINO's CPU plugin runs a grouped convolution of a few channels per group (MobileFaceNet's second
# layer at width 2: 128 channels in 64 groups of 2, 56x56) in a generic kernel, at a fraction of a
# depthwise convolution's speed: a third of w600k_mbf's time on AVX-512. The same convolution written
# as groups of 8 channels (each old group's weights on the diagonal of a new group's, zeros elsewhere)
# adds the same products (the zeros add nothing): bit-identical outputs, and w600k_mbf packages at
# 1.04x (fp32), 1.21x (bf16), 1.07x (int8) images/s (batch 16, 2 threads, AVX-512 EPYC;
# benchmarks/profile_layers.py shows the layer)
REGROUP_CHANNELS = 8


def regroup_narrow_group_convolutions(model, channels: int = REGROUP_CHANNELS) -> list[str]:
    """Rewrite in place each GroupConvolution with float weights and fewer than ``channels`` input and
    output channels per group (not depthwise: one each) as the same convolution in groups of
    ``channels``; what was rewritten, for the manifest."""
    ov = _ov()
    from openvino import opset13

    done = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "GroupConvolution":
            continue
        node = op.input_value(1).get_node()
        if node.get_type_name() != "Constant" or node.get_element_type() != ov.Type.f32:
            continue  # quantized or compressed weights: left as they are
        w = node.get_data()
        groups, outs, ins = (int(d) for d in w.shape[:3])
        if outs != ins or outs == 1 or outs >= channels or channels % outs or (groups * outs) % channels:
            continue
        per = channels // outs  # old groups in a new one
        wide = np.zeros((groups // per, channels, channels, *w.shape[3:]), w.dtype)
        for g in range(groups):
            k, j = divmod(g, per)
            wide[k, j * outs : (j + 1) * outs, j * ins : (j + 1) * ins] = w[g]
        attrs = op.get_attributes()
        new = opset13.group_convolution(
            op.input_value(0),
            opset13.constant(wide),
            attrs["strides"],
            attrs["pads_begin"],
            attrs["pads_end"],
            attrs["dilations"],
            attrs["auto_pad"],
        )
        new.set_friendly_name(op.get_friendly_name())
        for target in op.output(0).get_target_inputs():
            target.replace_source_output(new.output(0))
        done.append(
            f"GroupConvolution '{op.get_friendly_name()}': {groups} groups of {outs} channels -> "
            f"{groups // per} groups of {channels} (block-diagonal weights, the same sums)"
        )
    if done:
        model.validate_nodes_and_infer_types()
    return done


def weighted_ops(model) -> list:
    return [op for op in model.get_ordered_ops() if op.get_type_name() in WEIGHTED]


def input_spreads(model, x: np.ndarray, batch: int = 16) -> dict[str, float]:
    """The per-channel range spread of every convolution's input (see
    :func:`arcdeploy.quantize.channel_spread`), measured by running the float model on ``x``. Each
    input's per-channel min and max are reduced inside the graph (ReduceMin / ReduceMax over all
    but the channel axis): only [C] vectors leave it, not a detector's [N, C, 320, 320] tensors."""
    import openvino.opset13 as ops

    probe = model.clone()
    first = len(probe.outputs)  # the model's own outputs come first (a detector has several)
    convs = [op for op in weighted_ops(probe) if op.get_type_name() != "MatMul"]
    # convolutions that read the same tensor (a detector's heads) share one pair of added outputs
    ports = [op.input_value(0) for op in convs]
    keys = [(p.get_node().get_friendly_name(), p.get_index()) for p in ports]
    unique = list(dict.fromkeys(keys))
    reduced = []
    for key in unique:
        port = ports[keys.index(key)]
        axes = ops.constant(np.array([a for a in range(port.get_partial_shape().rank.get_length()) if a != 1]))
        reduced += [ops.reduce_min(port, axes, keep_dims=False).output(0), ops.reduce_max(port, axes, False).output(0)]
    probe.add_outputs(reduced)
    slot = {key: first + 2 * i for i, key in enumerate(unique)}
    compiled = _compile(probe, {"INFERENCE_PRECISION_HINT": "f32"}, "the model (measuring activation ranges)")
    req = compiled.create_infer_request()
    lo: dict = {}
    hi: dict = {}
    for s in range(0, len(x), batch):
        req.infer({0: x[s : s + batch]})
        for key in unique:
            mn, mx = (req.get_output_tensor(slot[key] + k).data.copy() for k in (0, 1))  # [C] each
            lo[key] = np.minimum(lo[key], mn) if key in lo else mn
            hi[key] = np.maximum(hi[key], mx) if key in hi else mx
    out = {}
    for op, key in zip(convs, keys):
        ranges = hi[key] - lo[key]
        out[op.get_friendly_name()] = range_spread(ranges) if ranges.size else 0.0
    return out


def float_ops(model, recipe: QuantRecipe, spreads: dict[str, float] | None = None) -> FloatScope:
    """The OpenVINO op names the recipe keeps in float (graph order)."""
    ops = list(model.get_ordered_ops())
    scope = FloatScope()
    if "stem" in recipe.keep_float:
        conv = next((op for op in ops if op.get_type_name() == "Convolution"), None)
        if conv is not None:
            scope.add(conv.get_friendly_name(), "stem")
    if "spread" in recipe.keep_float and spreads:
        for name in spread_layers(spreads, recipe):
            scope.add(name, "spread")
            scope.spreads[name] = spreads[name]
    if "depthwise" in recipe.keep_float:
        for op in ops:
            if op.get_type_name() == "GroupConvolution":
                w = op.input(1).get_partial_shape()  # [groups, out per group, in per group, kh, kw]
                if w.is_static and len(w) == 5 and w[2].get_length() <= DEPTHWISE_MAX_GROUP_INPUTS:
                    scope.add(op.get_friendly_name(), "depthwise")
    if "head" in recipe.keep_float:
        idx = max((i for i, op in enumerate(ops) if op.get_type_name() == "MatMul"), default=None)
        if idx is not None:
            for op in ops[idx:]:
                if op.get_type_name() not in ("Result", "Constant"):
                    scope.add(op.get_friendly_name(), "head")
    for name in recipe.float_layers:
        scope.add(name, "layers")
    return scope


def quantize(model, recipe: QuantRecipe, x: np.ndarray):
    """NNCF post-training quantization of an OpenVINO model; (model, scope kept in float)."""
    spreads = input_spreads(model, x[:SPREAD_SAMPLES]) if "spread" in recipe.keep_float else None
    scope = float_ops(model, recipe, spreads)
    # the fc MatMul is enough to keep the head: NNCF never quantizes the folded BN1d after it
    head = [n for n, role in scope.entries if role == "head"]
    ignored = [n for n, role in scope.entries if role != "head"] + head[:1]
    return nncf_quantize(model, [x[i : i + 1] for i in range(len(x))], recipe, ignored), scope


def input_quantizers_on_pixel_grid(model, spec) -> int:
    """Put the quantizers that take the graph's input (normalised uint8 pixels, ``(p - mean) / std``,
    NCHW) on the pixels' own grid: range ``(0 - mean) / std`` .. ``(255 - mean) / std`` in 256 levels,
    so each pixel value is one level exactly and quantizing the input loses nothing (NNCF's range from
    the calibration images is a little narrower or wider, and its levels fall between the pixels').
    Returns how many quantizers were set (0 where the first layers stay in float)."""
    ov = _ov()
    mean, std = spec.norm_vectors()
    low, high = (0.0 - mean) / std, (255.0 - mean) / std
    if low.size > 1:  # per channel, on the channel axis of NCHW
        low, high = low.reshape(1, -1, 1, 1), high.reshape(1, -1, 1, 1)
    count = 0
    for param in model.get_parameters():
        for target in param.output(0).get_target_inputs():
            fq = target.get_node()
            if fq.get_type_name() != "FakeQuantize" or fq.get_levels() != 256:
                continue
            for port, value in ((1, low), (2, high), (3, low), (4, high)):
                fq.input(port).replace_source_output(ov.op.Constant(np.ascontiguousarray(value)).output(0))
            count += 1
    model.validate_nodes_and_infer_types()
    return count


_FLOAT_F32 = {"inference_precision": "f32"}  # the reverter's models: float layers in f32
COST_ROUNDS = 5  # calls of each model whose per-layer times give a layer's float cost (medians)


class LayerReverter:
    """An int8 model with chosen layers put back in float, for ranking layers by what int8 costs
    them: each layer's input FakeQuantize is bypassed and its fp32 weights restored (no new
    calibration), so trying a layer costs one compile. Residual Adds whose inputs are quantized
    are layers too (on deep IResNets their quantizers cost as much as the convolutions)."""

    def __init__(self, quantized_path: Path, float_onnx: Path, threads: int | None = None, batch: int = 16):
        self.quantized = _read(quantized_path)
        self.float = {op.get_friendly_name(): op for op in convert(float_onnx).get_ordered_ops()}
        self.threads = threads
        self.batch = batch  # a package compiled for a fixed batch takes exactly that many

    def layers(self) -> list[str]:
        """Layers that int8 touches: weighted ones (an input quantizer or low-precision weights)
        and residual Adds (a quantizer on an input)."""
        out = []
        for op in self.quantized.get_ordered_ops():
            kind = op.get_type_name()
            if kind in WEIGHTED:
                w = op.input_value(1).get_node()
                low_weights = w.get_type_name() != "Constant" or w.get_element_type() != _ov().Type.f32
                if low_weights or _upstream_quantizer(op.input(0)) is not None:
                    out.append(op.get_friendly_name())
            elif kind == "Add" and any(
                _upstream_quantizer(op.input(k)) is not None for k in range(op.get_input_size())
            ):
                out.append(op.get_friendly_name())
        return out

    def embed(self, names: list[str], x: np.ndarray) -> np.ndarray:
        run = self.runner(names)
        return np.concatenate([run(x[s : s + self.batch])[0] for s in range(0, len(x), self.batch)])

    def runner(self, names: list[str]) -> Callable[[np.ndarray], list[np.ndarray]]:
        """The model with ``names`` back in float, compiled: inputs -> every output (float32)."""
        model = self._reverted(names)
        config = compile_config(_FLOAT_F32, self.threads)  # float layers in f32, as a package runs them
        req = _compile(model, config, "the int8 model (ranking layers)").create_infer_request()
        n_out = len(model.outputs)

        def run(x: np.ndarray) -> list[np.ndarray]:
            req.infer({0: x})
            return [np.array(req.get_output_tensor(k).data, dtype=np.float32, copy=True) for k in range(n_out)]

        return run

    def _reverted(self, names: list[str]):
        """A copy of the int8 model with ``names`` back in float (not compiled)."""
        model = self.quantized.clone()
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        for name in names:
            op = ops[name]
            if op.get_type_name() == "Add":
                for k in range(op.get_input_size()):
                    _bypass(_upstream_quantizer(op.input(k)))
                continue
            _bypass(_upstream_quantizer(op.input(0)))
            weights = self.float[name].input_value(1).get_node()
            if weights.get_type_name() == "Constant":
                op.input(1).replace_source_output(_ov().op.Constant(weights.get_data().copy()).output(0))
            for target in op.output(0).get_target_inputs():  # the bias, which bias correction changed
                bias_add = target.get_node()
                original = self.float.get(bias_add.get_friendly_name())
                if bias_add.get_type_name() == "Add" and original is not None:
                    for k in (0, 1):
                        const = original.input_value(k).get_node()
                        if const.get_type_name() == "Constant":
                            bias_add.input(k).replace_source_output(
                                _ov().op.Constant(const.get_data().copy()).output(0)
                            )
        model.validate_nodes_and_infer_types()
        return model

    def float_costs(
        self, names: list[str], x: np.ndarray, threads: int | None = None, rounds: int = COST_ROUNDS
    ) -> dict[str, float]:
        """What each of ``names`` costs back in float: its milliseconds per call on ``x`` (one batch,
        ``threads`` engine threads; default the reverter's) in the model with all of ``names`` in
        float, less its milliseconds in the int8 model, from OpenVINO's per-node counters
        (``PERF_COUNT``; medians over ``rounds`` calls of each model, compiled once each). A layer's
        milliseconds are its own node's and those of the reorders the plugin puts in front of it
        (named ``<from>_<layout>_<layout>_<layer>``). Per node because the machine's noise between
        two compiled models (5-10% of the whole) is larger than most layers' costs; what it leaves
        out is what a layer's precision changes around it (a float first convolution also needs the
        canvas normalised in float), so a cost of 0 means unseen, not free. A layer OpenVINO fuses
        into another (a residual Add into its convolution) costs nearly nothing of its own."""
        if not names:
            return {}
        threads = self.threads if threads is None else threads
        int8, floated = (_node_ms(m, x, threads, rounds) for m in (self.quantized, self._reverted(names)))

        def own(times: dict[tuple[str, str], float], name: str) -> float:
            return sum(
                ms
                for (node, kind), ms in times.items()
                if node == name or (kind == "Reorder" and node.endswith("_" + name))
            )

        return {n: max(0.0, own(floated, n) - own(int8, n)) for n in names}


def _node_ms(model, x: np.ndarray, threads: int | None, rounds: int) -> dict[tuple[str, str], float]:
    """Milliseconds per call of each executed node of ``model`` on ``x``, by (name, type) (OpenVINO's
    per-node counters; medians over ``rounds`` calls)."""
    config = {**compile_config(_FLOAT_F32, threads), "PERF_COUNT": True}
    req = _compile(model, config, "the int8 model (timing layers)").create_infer_request()
    req.infer({0: x})  # the first call pays one-off allocations
    samples: dict[tuple[str, str], list[float]] = {}
    for _ in range(max(1, rounds)):
        req.infer({0: x})
        for info in req.get_profiling_info():
            samples.setdefault((info.node_name, info.node_type), []).append(info.real_time.total_seconds() * 1e3)
    return {key: float(np.median(v)) for key, v in samples.items()}


# ops a quantizer may sit behind on its way to the layer it serves: NNCF moves an input quantizer up
# through a per-channel scale and shift (a BatchNorm before a convolution) and through reshapes
_TRANSPARENT = ("Multiply", "Add", "Subtract", "Reshape", "Transpose", "Convert", "Squeeze", "Unsqueeze")


def _upstream_quantizer(port, depth: int = 8):
    """The input port that takes a FakeQuantize's output on the data path leading into ``port``
    (through ops that only scale, shift or reshape it), or None."""
    for _ in range(depth):
        src = port.get_source_output().get_node()
        kind = src.get_type_name()
        if kind == "FakeQuantize":
            return port
        if kind not in _TRANSPARENT:
            return None
        data = [
            src.input(k)
            for k in range(src.get_input_size())
            if src.input_value(k).get_node().get_type_name() != "Constant"
        ]
        if len(data) != 1:
            return None
        port = data[0]
    return None


def _bypass(port) -> None:
    """Feed ``port`` with what its FakeQuantize took in (no-op for None)."""
    if port is not None:
        port.replace_source_output(port.get_source_output().get_node().input_value(0))


def reverter(job: BuildJob) -> LayerReverter:
    return LayerReverter(
        job.out_dir / "model.xml", job.onnx_path, job.manifest.threads, batch=job.manifest.fixed_batch or 16
    )


def _check(precision: Precision) -> None:
    return None


def build(job: BuildJob) -> None:
    ov = _ov()
    model = convert(job.onnx_path)
    cfg: dict[str, Any] = {"device": Device.CPU, "performance_hint": job.options.get("performance_hint", "LATENCY")}
    if job.precision in HINTS:
        cfg["inference_precision"] = HINTS[job.precision]
    if job.precision is Precision.INT8:
        assert job.recipe is not None and job.calib_inputs is not None
        model, scope = quantize(model, job.recipe, job.calib_inputs)
        if job.recipe.pixel_input:
            input_quantizers_on_pixel_grid(model, job.input)
        job.manifest.calibration = job.recipe.manifest_entry(
            "NNCF post-training quantization (OpenVINO)", scope, len(job.calib_inputs)
        )
        if job.recipe.float_precision is not FloatLayerPrecision.AUTO:
            cfg["inference_precision"] = job.recipe.float_precision.value
    if job.batch:
        model.reshape({model.inputs[0]: ov.PartialShape([int(job.batch), 3, *job.input.size])})
        job.manifest.dynamic_batch = False
    job.manifest.graph_rewrites = regroup_narrow_group_convolutions(model)
    if job.fold_preprocessing:
        model = _fold_preprocessing(model, job.input)
    # fp16 keeps its weights in f16 on disk (what an f16 deployment ships); others stay exact
    ov.save_model(model, str(job.out_dir / "model.xml"), compress_to_fp16=(job.precision is Precision.FP16))
    job.manifest.files = {"model": "model.xml", "weights": "model.bin"}
    job.manifest.engine_config = cfg
    compiled = _compile(str(job.out_dir / "model.xml"), compile_config(cfg, job.manifest.threads), "the built model")
    executed = executed_precisions(compiled)
    if job.precision in (Precision.FP16, Precision.BF16) and executed.inference_precision != HINTS[job.precision]:
        executed.note = (
            f"this CPU has no native {job.precision}: the compiled model reports inference precision "
            f"{executed.inference_precision} despite the {HINTS[job.precision]} hint"
        )
        job.warnings.append(executed.note + " (recorded in the manifest)")
    if job.precision is Precision.INT8:
        executed.note = f"layers left in float run in {executed.inference_precision}" + (
            " (the CPU plugin's default)" if "inference_precision" not in cfg else " (as the recipe asks)"
        )
    job.manifest.executed = executed
    job.manifest.device = Device.CPU


def _fold_preprocessing(model, spec):
    """``model`` (float NCHW input) taking uint8 NHWC RGB instead: converted, its channels put in the
    model's order, normalised with the spec's mean and std, all in NHWC, and only then transposed to
    NCHW. Why this order and not OpenVINO's PrePostProcessor: that transposes the uint8 image first,
    and the CPU plugin then reorders the normalised planes back to NHWC for a 3-channel first
    convolution (its kernel reads NHWC), two passes over the canvas for nothing; with the transpose
    last the plugin drops the pair. Measured on SCRFD-500M at 640x640 (one thread, AVX-512 EPYC):
    the transpose and reorder took 1.6 of 21 ms; the outputs are the same to the last bit."""
    ov = _ov()
    from openvino import opset13 as ops

    (old,) = model.get_parameters()
    shape = old.get_partial_shape()
    nhwc = ov.PartialShape([shape[0], shape[2], shape[3], shape[1]])
    image = ops.parameter(nhwc, ov.Type.u8, name=old.get_friendly_name())
    image.output(0).get_tensor().set_names(old.output(0).get_tensor().get_names())
    x = ops.convert(image, ov.Type.f32)
    if spec.color == "BGR":  # the caller's RGB, turned into the B, G, R the model was trained on
        x = ops.gather(x, ops.constant(np.array([2, 1, 0], np.int64)), ops.constant(np.int64(3)))
    if not spec.normalize_in_graph:
        mean, std = spec.norm_vectors()
        x = ops.divide(ops.subtract(x, ops.constant(mean)), ops.constant(std))
    x = ops.transpose(x, ops.constant(np.array([0, 3, 1, 2], np.int64)))
    for target in list(old.output(0).get_target_inputs()):
        target.replace_source_output(x.output(0))
    folded = ov.Model(model.get_results(), [image], model.get_friendly_name())
    folded.validate_nodes_and_infer_types()
    return folded


def _version() -> str:
    return str(_ov().get_version())


ENGINE = Engine(
    name="openvino",
    requirement="openvino",
    module="openvino",
    capabilities=Capabilities(
        precisions=tuple(Precision),
        devices=(Device.CPU,),
        async_requests=True,
        reports_executed=True,
        folds_preprocessing=True,
        static_batch=True,
        quantizer="NNCF (OpenVINO backend)",
    ),
    build=build,
    runtime=OpenVINORuntime,
    open_graph=open_graph,
    check=_check,
    describe_library=_version,
    reverter=reverter,
)
