"""ONNX Runtime engine: CPU, or CUDA / TensorRT when onnxruntime-gpu provides them.

fp32 and int8 (static QDQ) packages run on the CPU provider; an fp16 package
needs a GPU provider and says so when none is installed.
"""
from __future__ import annotations

import numpy as np

from ..errors import ArcdeployError
from .base import Engine

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def gpu_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in GPU_PROVIDERS if p in available]


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        import onnxruntime as ort

        self.threads = threads or manifest.get("threads")
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = int(self.threads)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = gpu_providers() if options.get("gpu", True) else []
        if manifest.get("precision") == "fp16" and not providers:
            raise ArcdeployError(f"{self.package_dir}: an fp16 ONNX Runtime package needs a GPU "
                                 "(CUDAExecutionProvider from onnxruntime-gpu); none is available here")
        providers.append("CPUExecutionProvider")
        model = self.package_dir / manifest["files"]["model"]
        self.session = ort.InferenceSession(str(model), so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else None

    def infer(self, x: np.ndarray) -> np.ndarray:
        if self.input_dtype is not None and x.dtype == np.float32:
            x = x.astype(self.input_dtype)
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32, copy=False)

    def describe(self) -> dict:
        import onnxruntime as ort

        providers = self.session.get_providers()
        return {**super().describe(), "providers": providers, "version": ort.__version__,
                "device": "GPU" if providers[0] != "CPUExecutionProvider" else "CPU",
                "threads": self.threads or "default (one per physical core)"}
