"""OpenVINO engine (CPU): an IR model (model.xml/.bin) compiled with the
manifest's precision hint and threads.

The precision the CPU plugin *executes* is read back from the compiled model
(``INFERENCE_PRECISION_HINT`` and each layer's ``runtimePrecision``), because a
bf16/f16 hint on a CPU without bf16/fp16 units silently runs f32.

For throughput measurements ``infer_many`` keeps several infer requests in
flight (``openvino.AsyncInferQueue``); load the package with
``performance_hint="THROUGHPUT"`` so the plugin makes one stream per request.
``compiled_model`` is public for callers that drive requests themselves.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from .base import Engine

# layer types whose runtime precision says what the heavy math runs in
COMPUTE_LAYERS = ("Convolution", "FullyConnected", "MatMul", "Gemm", "GroupConvolution", "Deconvolution")


def executed_precisions(compiled_model) -> dict:
    """{"inference_precision": ..., "layers": {"Convolution": {"u8": 21}, ...}} of a compiled model."""
    layers: dict[str, Counter] = {}
    for op in compiled_model.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" not in info or "runtimePrecision" not in info:
            continue
        kind = info["layerType"].astype(str)
        if kind in COMPUTE_LAYERS:
            layers.setdefault(kind, Counter())[info["runtimePrecision"].astype(str)] += 1
    hint = compiled_model.get_property("INFERENCE_PRECISION_HINT")
    return {
        "inference_precision": _type_name(hint),
        "layers": {k: dict(sorted(v.items())) for k, v in sorted(layers.items())},
    }


def _type_name(t) -> str:
    # openvino.Type -> "f32", "bf16", "f16"
    name = getattr(t, "get_type_name", None)
    return name() if name else str(t)


def compile_config(manifest: dict, threads: int | None, performance_hint: str | None = None,
                   num_requests: int | None = None) -> dict:
    ovm = manifest.get("openvino", {})
    config = {"PERFORMANCE_HINT": (performance_hint or ovm.get("performance_hint") or "LATENCY").upper()}
    if ovm.get("inference_precision"):
        config["INFERENCE_PRECISION_HINT"] = ovm["inference_precision"]
    threads = threads or manifest.get("threads")
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if num_requests:
        config["PERFORMANCE_HINT_NUM_REQUESTS"] = int(num_requests)
    return config


class OpenVINOEngine(Engine):
    name = "openvino"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        import openvino as ov

        self._ov = ov
        self.config = compile_config(manifest, threads, options.get("performance_hint"), options.get("num_requests"))
        core = ov.Core()
        model = core.read_model(str(self.package_dir / manifest["files"]["model"]))
        self.device = manifest.get("openvino", {}).get("device", "CPU")
        self.compiled_model = core.compile_model(model, self.device, self.config)
        self.request = self.compiled_model.create_infer_request()
        self._queue = None

    def infer(self, x: np.ndarray) -> np.ndarray:
        out = self.request.infer({0: x})
        return np.asarray(out[0], dtype=np.float32)

    def infer_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Run the batches on ``OPTIMAL_NUMBER_OF_INFER_REQUESTS`` requests at once."""
        if self._queue is None:
            jobs = int(self.compiled_model.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._queue = self._ov.AsyncInferQueue(self.compiled_model, max(1, jobs))
        results: list = [None] * len(batches)

        def done(request, index):
            results[index] = request.get_output_tensor(0).data.astype(np.float32, copy=True)

        self._queue.set_callback(done)
        for i, b in enumerate(batches):
            self._queue.start_async({0: b}, userdata=i)
        self._queue.wait_all()
        return results

    def describe(self) -> dict:
        cm = self.compiled_model
        return {
            **super().describe(),
            "device": self.device,
            "version": self._ov.get_version(),
            "threads": int(cm.get_property("INFERENCE_NUM_THREADS")),
            "performance_hint": str(cm.get_property("PERFORMANCE_HINT")).split(".")[-1],
            "streams": int(cm.get_property("NUM_STREAMS")),
            "infer_requests": int(cm.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")),
            "requested_precision_hint": self.config.get("INFERENCE_PRECISION_HINT"),
            "executed": executed_precisions(cm),
        }
