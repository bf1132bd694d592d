"""PyTorch engine: the TorchScript model.pt, eager-equivalent fp32 on the CPU,
fp16 / bf16 on a CUDA GPU when one is present."""
from __future__ import annotations

import numpy as np

from ..errors import ArcdeployError
from .base import Engine

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class TorchEngine(Engine):
    name = "torch"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        import torch

        self._torch = torch
        self.threads = threads or manifest.get("threads")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        precision = manifest.get("precision", "fp32")
        if precision not in DTYPES:
            raise ArcdeployError(f"{self.package_dir}: torch packages run fp32, fp16 or bf16, not {precision}")
        want = manifest.get("device", "CPU")
        if want.startswith("cuda") and not torch.cuda.is_available():
            raise ArcdeployError(f"{self.package_dir}: built for {want}, but torch sees no CUDA GPU here")
        self.device = torch.device("cuda" if want.startswith("cuda") else "cpu")
        self.dtype = getattr(torch, DTYPES[precision])
        model = torch.jit.load(str(self.package_dir / manifest["files"]["model"]), map_location=self.device)
        self.model = model.to(self.dtype).eval()

    def infer(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, self.dtype)
            return self.model(t).float().cpu().numpy()

    def describe(self) -> dict:
        return {**super().describe(), "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "version": self._torch.__version__, "threads": self._torch.get_num_threads()}
