"""PyTorch: the TorchScript model, eager-equivalent fp32 on the CPU, fp16 / bf16 on a CUDA GPU.

Thread safety: a TorchScript module's forward in inference mode holds no state
between calls, so concurrent callers share it.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError, first_line
from .base import BuildJob, Capabilities, Engine, GraphSession, Runtime, RuntimeInfo, TensorInfo

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
EXECUTES = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


@functools.lru_cache(maxsize=1)
def _torch():
    import torch

    return torch


def load_torchscript(path: Path, device: str = "cpu"):
    """A TorchScript file (only ever one inside a package or export folder) in eval mode."""
    torch = _torch()
    try:
        return torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise ArcdeployError(f"{path}: cannot load the TorchScript model ({first_line(exc)})") from None


class TorchScriptGraph(GraphSession):
    """A TorchScript model with one input and one output, run in fp32 on the CPU."""

    def __init__(self, path, threads: int | None = None, **_: Any):
        torch = _torch()
        if threads:
            torch.set_num_threads(int(threads))
        self.path = Path(path)
        self.model = load_torchscript(self.path).float()
        self.inputs = [TensorInfo("input", [None, 3, 112, 112], "float32")]
        self.outputs = [TensorInfo("embedding", [None, None], "float32")]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        torch = _torch()
        (x,) = feeds.values()
        with torch.inference_mode():
            return [self.model(torch.from_numpy(np.ascontiguousarray(x))).float().numpy()]


def open_graph(path, threads: int | None = None, **options: Any) -> TorchScriptGraph:
    return TorchScriptGraph(path, threads, **options)


def cuda_device(want: str, what: str) -> str:
    """``cuda`` when torch sees a GPU; a one-line reason otherwise."""
    torch = _torch()
    if not torch.cuda.is_available():
        reason = (
            "this torch build has no CUDA (a CPU-only wheel)"
            if torch.version.cuda is None
            else "torch has CUDA but sees no GPU (driver missing, or CUDA_VISIBLE_DEVICES hides it)"
        )
        raise ArcdeployError(f"{what} needs a CUDA GPU: {reason}")
    return want if want.startswith("cuda") else "cuda"


class TorchRuntime(Runtime):
    engine_name = "torch"

    def __init__(self, package_dir, manifest, threads=None, **options):
        super().__init__(package_dir, manifest, threads, **options)
        torch = _torch()
        if self.threads:
            torch.set_num_threads(int(self.threads))
        precision = manifest.precision
        if precision not in DTYPES:
            raise ArcdeployError(f"{self.package_dir}: torch packages run fp32, fp16 or bf16, not {precision}")
        want = manifest.device.lower()
        device = (
            cuda_device(want, f"{self.package_dir} (built for {manifest.device})") if want.startswith("cuda") else "cpu"
        )
        self.device = torch.device(device)
        self.dtype = getattr(torch, DTYPES[precision])
        model = load_torchscript(manifest.file(self.package_dir), device)
        self.model = model.to(self.dtype)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def infer(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x))
            if self.device.type == "cuda":
                t = t.pin_memory().to(self.device, non_blocking=True).to(self.dtype)
                t = t.contiguous(memory_format=torch.channels_last)
            else:
                t = t.to(self.dtype)
            return self.model(t).float().cpu().numpy()

    @property
    def _torch(self):
        return _torch()

    def describe(self) -> RuntimeInfo:
        torch = _torch()
        details: dict[str, Any] = {"dtype": str(self.dtype).replace("torch.", "")}
        if self.device.type == "cuda":
            details["gpu"] = torch.cuda.get_device_name(self.device)
        return RuntimeInfo(
            engine="torch",
            device=str(self.device),
            precision=self.manifest.precision,
            executes=EXECUTES[self.manifest.precision],
            threads=torch.get_num_threads(),
            version=torch.__version__,
            details=details,
        )


def _check(precision: str) -> None:
    if precision in ("fp16", "bf16"):
        cuda_device("cuda", f"precision {precision} with --engine torch")


def build(job: BuildJob) -> None:
    if job.torchscript_path is None:
        raise ArcdeployError(
            "the torch engine needs a TorchScript model: build from a checkpoint or its export folder "
            "(a foreign ONNX has none; use --engine openvino or onnxruntime)"
        )
    if job.fold_preprocessing:
        raise ArcdeployError("--fold-preprocessing is for openvino and onnxruntime; the torch engine takes float input")
    shutil.copyfile(job.torchscript_path, job.out_dir / "model.pt")
    job.manifest.files = {"model": "model.pt"}
    job.manifest.engine_config = {"format": "torchscript (torch.jit.trace of the eager model)"}
    if job.precision in ("fp16", "bf16"):
        job.manifest.device = "cuda"
    job.manifest.executed = {"inference_precision": EXECUTES[job.precision]}


def _version() -> str:
    return str(_torch().__version__)


ENGINE = Engine(
    name="torch",
    requirement="torch",
    module="torch",
    capabilities=Capabilities(
        precisions=("fp32", "fp16", "bf16"),
        gpu_only=("fp16", "bf16"),
        devices=("CPU", "cuda"),
        async_requests=False,
        reports_executed=False,
        folds_preprocessing=False,
        static_batch=False,
        quantizer=None,
    ),
    build=build,
    runtime=TorchRuntime,
    open_graph=open_graph,
    check=_check,
    describe_library=_version,
)
