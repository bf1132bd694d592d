"""PyTorch: the TorchScript model, eager-equivalent fp32 on the CPU, fp16 / bf16 on a CUDA GPU.

On a GPU the runtime is set up the way fast PyTorch inference is: the TorchScript
is frozen and optimised for inference (conv + BN folding), weights and inputs are
channels-last in the package's dtype, cuDNN picks its kernels per shape
(``cudnn.benchmark``), inputs go through pinned host memory, and small batches
replay a captured CUDA graph (one per batch size; launch overhead dominates there).
Timing synchronises the device and reports the host-to-device copy apart from the
compute, as a vendor's ``mm_run`` does.

Thread safety: on the CPU a TorchScript forward in inference mode keeps no state
between calls, so concurrent callers share it; on a GPU the captured graphs share
static buffers, so calls are serialised with a lock (the GPU runs one at a time
anyway).
"""

from __future__ import annotations

import functools
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ArcdeployError, first_line
from ..manifest import ExecutedRecord
from ..types import Device, Precision
from .base import BuildJob, Capabilities, Engine, GraphSession, Runtime, RuntimeInfo, StopRule, TensorInfo

DTYPES = {Precision.FP32: "float32", Precision.FP16: "float16", Precision.BF16: "bfloat16"}
EXECUTES = {Precision.FP32: "f32", Precision.FP16: "f16", Precision.BF16: "bf16"}
GPU_PRECISIONS = (Precision.FP16, Precision.BF16)
CUDA_GRAPH_MAX_BATCH = 64  # above this the kernels are long enough that launch overhead does not matter


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


class TorchGraph(GraphSession):
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


def open_graph(path, threads: int | None = None, **options: Any) -> TorchGraph:
    return TorchGraph(path, threads, **options)


def cuda_device(want: str, what: str) -> str:
    """``cuda[:N]`` when torch sees a GPU; a one-line reason otherwise."""
    torch = _torch()
    if not torch.cuda.is_available():
        reason = (
            "this torch build has no CUDA (a CPU-only wheel; install a CUDA build of torch)"
            if torch.version.cuda is None
            else "torch has CUDA but sees no GPU (no driver, or CUDA_VISIBLE_DEVICES hides it)"
        )
        raise ArcdeployError(f"{what} needs a CUDA GPU: {reason}")
    return want if want.startswith("cuda") else "cuda"


class _CudaGraphs:
    """Captured forward passes, one per batch size, replayed with static input/output buffers."""

    def __init__(self, model, device, dtype, shape_tail: tuple[int, ...]):
        self.model, self.device, self.dtype, self.tail = model, device, dtype, shape_tail
        self.graphs: dict[int, tuple[Any, Any, Any]] = {}

    def run(self, x_dev):
        torch = _torch()
        n = int(x_dev.shape[0])
        if n not in self.graphs:
            static_in = torch.empty((n, *self.tail), device=self.device, dtype=self.dtype).contiguous(
                memory_format=torch.channels_last
            )
            static_in.copy_(x_dev)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(3):  # warm up cuDNN's choice before capturing
                    self.model(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.model(static_in)
            self.graphs[n] = (graph, static_in, static_out)
        graph, static_in, static_out = self.graphs[n]
        static_in.copy_(x_dev)
        graph.replay()
        return static_out


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
        on_gpu = manifest.device is Device.CUDA
        device = cuda_device("cuda", f"{self.package_dir} (built for {manifest.device})") if on_gpu else "cpu"
        self.device = torch.device(device)
        self.dtype = getattr(torch, DTYPES[precision])
        model = load_torchscript(manifest.file(self.package_dir), device).to(self.dtype)
        self._lock = threading.Lock() if on_gpu else None
        self._graphs: _CudaGraphs | None = None
        self.last_breakdown: dict | None = None
        if on_gpu:
            torch.backends.cudnn.benchmark = True
            model = model.to(memory_format=torch.channels_last)
            if options.get("optimize", True):
                # fold BN into the convolutions and specialise the graph for inference
                model = torch.jit.optimize_for_inference(torch.jit.freeze(model))
            if options.get("cuda_graphs", True):
                h, w = manifest.input.size
                self._graphs = _CudaGraphs(model, self.device, self.dtype, (3, h, w))
        self.model = model

    # ---- one batch
    def _to_device(self, x: np.ndarray):
        torch = _torch()
        t = torch.from_numpy(np.ascontiguousarray(x))
        if self.device.type != "cuda":
            return t.to(self.dtype)
        t = t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def _forward(self, t):
        if self._graphs is not None and t.shape[0] <= CUDA_GRAPH_MAX_BATCH:
            return self._graphs.run(t)
        return self.model(t)

    def infer(self, x: np.ndarray) -> np.ndarray:
        torch = _torch()
        with torch.inference_mode():
            if self._lock is None:
                return self.model(self._to_device(x)).float().numpy()
            with self._lock:
                return self._forward(self._to_device(x)).float().cpu().numpy()

    # ---- timing
    def timed_runs(self, x: np.ndarray, in_flight: int, warmup: int, stop: StopRule) -> tuple[list[float], float]:
        """On a GPU: per run, the host-to-device copy, the compute and the copy back, each timed with
        CUDA events (the device synchronised after each run); latency is their sum."""
        if self.device.type != "cuda":
            return super().timed_runs(x, in_flight, warmup, stop)
        torch = _torch()
        host = torch.from_numpy(np.ascontiguousarray(x)).pin_memory()
        parts: dict[str, list[float]] = {"h2d": [], "compute": [], "d2h": []}
        lat: list[float] = []
        with torch.inference_mode(), self._lock or threading.Lock():
            for _ in range(max(warmup, 1)):
                self._forward(host.to(self.device).to(self.dtype).contiguous(memory_format=torch.channels_last))
            torch.cuda.synchronize(self.device)
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            t0 = time.perf_counter()
            while not stop.done(len(lat), t0):
                ev[0].record()
                dev = (
                    host.to(self.device, non_blocking=True).to(self.dtype).contiguous(memory_format=torch.channels_last)
                )
                ev[1].record()
                out = self._forward(dev)
                ev[2].record()
                out.float().cpu()
                ev[3].record()
                torch.cuda.synchronize(self.device)
                h2d, comp, d2h = (ev[i].elapsed_time(ev[i + 1]) for i in range(3))
                parts["h2d"].append(h2d)
                parts["compute"].append(comp)
                parts["d2h"].append(d2h)
                lat.append(h2d + comp + d2h)
            wall = time.perf_counter() - t0
        self.last_breakdown = {k: float(np.median(v)) for k, v in parts.items()}
        return lat, wall

    def describe(self) -> RuntimeInfo:
        torch = _torch()
        details: dict[str, Any] = {"dtype": str(self.dtype).replace("torch.", "")}
        if self.device.type == "cuda":
            details.update(
                gpu=torch.cuda.get_device_name(self.device),
                cuda=torch.version.cuda,
                channels_last=True,
                cuda_graphs_up_to_batch=CUDA_GRAPH_MAX_BATCH if self._graphs is not None else 0,
            )
        return RuntimeInfo(
            engine="torch",
            device=str(self.device),
            precision=self.manifest.precision,
            executes=EXECUTES[self.manifest.precision],
            threads=torch.get_num_threads(),
            version=torch.__version__,
            details=details,
        )


def _check(precision: Precision) -> None:
    if precision in GPU_PRECISIONS:
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
    if job.precision in GPU_PRECISIONS:
        job.manifest.device = Device.CUDA
        job.manifest.engine_config["gpu"] = "frozen + optimize_for_inference, channels-last, CUDA graphs up to batch 64"
    job.manifest.executed = ExecutedRecord(inference_precision=EXECUTES[job.precision])


def _version() -> str:
    return str(_torch().__version__)


ENGINE = Engine(
    name="torch",
    requirement="torch",
    module="torch",
    capabilities=Capabilities(
        precisions=(Precision.FP32, *GPU_PRECISIONS),
        gpu_only=GPU_PRECISIONS,
        devices=(Device.CPU, Device.CUDA),
        async_requests=False,
        reports_executed=False,
        folds_preprocessing=False,
        static_batch=False,
        quantizer=None,
        model_is_reference=("torchscript",),
    ),
    build=build,
    runtime=TorchRuntime,
    open_graph=open_graph,
    check=_check,
    describe_library=_version,
)
