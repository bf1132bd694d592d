"""ONNX Runtime engine."""
from __future__ import annotations

import numpy as np

from .base import Engine


class OnnxRuntimeEngine(Engine):
    name = "onnxruntime"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available and options.get("gpu", True)]
        providers.append("CPUExecutionProvider")
        model = self.package_dir / manifest["files"]["model"]
        self.session = ort.InferenceSession(str(model), so, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0].astype(np.float32, copy=False)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {**super().describe(), "providers": self.session.get_providers(), "version": ort.__version__}
