"""What every engine provides: a builder, a runtime, a way to run any ONNX graph, and
the capabilities it declares.

An engine module defines one :class:`Engine` object named ``ENGINE`` and lists it in
:mod:`arcdeploy.engines.registry`. Nothing outside ``arcdeploy/engines`` imports an
engine's library (OpenVINO, ONNX Runtime; torch for running models).

Thread safety: every :class:`Runtime` and :class:`GraphSession` may be called from
several threads at once and returns exactly what a serial call returns (each engine
says how: a pool of infer requests, a thread-safe session, or a lock).
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ArcdeployError
from ..types import Device, Precision

if TYPE_CHECKING:
    from ..manifest import InputSpec, PackageManifest
    from ..quantize import QuantRecipe


@dataclass(frozen=True)
class Capabilities:
    """What an engine can build and how it runs."""

    precisions: tuple[Precision, ...]  # every precision it builds
    gpu_only: tuple[Precision, ...] = ()  # of those, the ones that need a GPU
    devices: tuple[Device, ...] = (Device.CPU,)
    async_requests: bool = False  # keeps several requests in flight itself
    reports_executed: bool = False  # can say what precision each layer runs in
    folds_preprocessing: bool = False  # can take uint8 NHWC and normalise in the graph
    static_batch: bool = False  # can compile for one fixed batch size
    quantizer: str | None = None  # who makes its int8 model
    # reference kinds its package's own model file already is (the torch engine's model.pt is the
    # fp32 TorchScript, cast when it runs): the package then stores no second copy as its reference
    model_is_reference: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class TensorInfo:
    name: str
    shape: list[Any]  # ints, or names / None for dynamic dimensions
    dtype: str  # "float32", "uint8", ...


@dataclass
class BuildJob:
    """Everything a builder needs; it writes its files into ``out_dir`` and fills
    ``manifest.files`` / ``engine_config`` / ``executed`` / ``device``."""

    onnx_path: Path  # the exported fp32 ONNX (dynamic batch, ``input`` convention below)
    out_dir: Path
    manifest: PackageManifest
    precision: Precision
    input: InputSpec  # the ONNX's input convention
    torchscript_path: Path | None = None
    recipe: QuantRecipe | None = None
    calib_inputs: np.ndarray | None = None  # int8: calibration batch already in ``input`` form
    batch: int | None = None
    fold_preprocessing: bool = False
    options: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class RuntimeInfo:
    """What is running (``describe``): the same keys for every engine."""

    engine: str
    device: str  # the device as the engine names it ("CPU", "cuda:0", ...)
    precision: Precision  # the package's precision
    executes: str | None  # what the engine reports it executes (e.g. "bf16"), if it can tell
    threads: int | str | None
    version: str
    streams: int | None = None
    infer_requests: int | None = None
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


class StopRule:
    """When a timed loop stops: after ``iterations`` runs, or once ``duration`` seconds
    have passed (with at least ``min_runs`` runs)."""

    def __init__(self, iterations: int | None, duration: float, min_runs: int = 1):
        self.iterations, self.duration, self.min_runs = iterations, duration, max(min_runs, 1)

    def done(self, runs: int, t_start: float) -> bool:
        if self.iterations is not None:
            return runs >= self.iterations
        return runs >= self.min_runs and time.perf_counter() - t_start >= self.duration


def time_calls(fn: Callable[[], Any], warmup: int, stop: StopRule) -> tuple[list[float], float]:
    """Call ``fn`` ``warmup`` times untimed, then until ``stop``; (latency of each call in ms, wall s)."""
    for _ in range(max(warmup, 0)):
        fn()
    lat: list[float] = []
    t0 = time.perf_counter()
    while not stop.done(len(lat), t0):
        s = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - s) * 1e3)
    return lat, time.perf_counter() - t0


def interleaved_rates(
    calls: Mapping[str, Callable[[], Any]],
    items: Mapping[str, int],
    rounds: int,
    seconds: float,
    min_runs: int = 1,
    warmup: int = 1,
    after_round: Callable[[int, dict[str, list[float]]], None] | None = None,
) -> dict[str, list[float]]:
    """Items per second of each call, timed in turns on a noisy machine: every round runs each call
    for ``seconds`` (at least ``min_runs`` times), the order rotating from round to round so none
    always goes first; ``warmup`` untimed calls each before the first round. ``items``: what one
    call processes (a batch size). {key: [rate per round]}; ``after_round(round, rates)`` after each."""
    keys = list(calls)
    for k in keys:  # first runs do one-time work (allocations, lazy compilation)
        for _ in range(max(warmup, 0)):
            calls[k]()
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for rnd in range(rounds):
        for k in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:
            lat, wall = time_calls(calls[k], 0, StopRule(None, seconds, min_runs))
            rates[k].append(items[k] * len(lat) / wall)
        if after_round is not None:
            after_round(rnd, rates)
    return rates


class GraphSession(ABC):
    """Any ONNX graph (a detector, a foreign model's source) run by one engine: named inputs
    and outputs, several threads at once."""

    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """All outputs, in graph order, for the named inputs."""

    def run_one(self, x: np.ndarray) -> np.ndarray:
        """The first output for the first input."""
        return self.run({self.inputs[0].name: x})[0]


class Runtime(ABC):
    """A package's compiled model: one input in the package's format, one output [N, D]."""

    engine_name = "engine"
    # what the last timed_runs spent where (e.g. {"h2d": ms, "compute": ms, "d2h": ms} on a GPU), if known
    last_breakdown: dict | None = None

    def __init__(self, package_dir: Path, manifest: PackageManifest, threads: int | None = None, **options: Any):
        self.package_dir = Path(package_dir)
        self.manifest = manifest
        self.threads = threads or manifest.threads
        self.options = options

    @abstractmethod
    def infer(self, x: np.ndarray) -> np.ndarray:
        """One batch in the package's input format -> float32 [N, D]. Thread-safe."""

    def infer_many(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Several batches, results in input order; engines with async requests overlap them."""
        return [self.infer(b) for b in batches]

    def timed_runs(self, x: np.ndarray, in_flight: int, warmup: int, stop: StopRule) -> tuple[list[float], float]:
        """Run ``x`` repeatedly with ``in_flight`` requests at once; (per-request latencies ms, wall s).

        The default keeps ``in_flight`` threads each calling :meth:`infer` (the runtime is
        thread-safe); engines with native async requests override this."""
        if in_flight <= 1:
            return time_calls(lambda: self.infer(x), warmup, stop)
        for _ in range(max(warmup, 0)):
            self.infer(x)
        lock = threading.Lock()
        lat = []
        started = [0]
        t0 = time.perf_counter()

        def worker() -> None:
            while True:
                with lock:
                    if stop.done(started[0], t0):
                        return
                    started[0] += 1
                s = time.perf_counter()
                self.infer(x)
                with lock:
                    lat.append((time.perf_counter() - s) * 1e3)

        with ThreadPoolExecutor(in_flight, thread_name_prefix="arcdeploy-bench") as pool:
            for fut in [pool.submit(worker) for _ in range(in_flight)]:
                fut.result()
        return lat, time.perf_counter() - t0

    def layer_profile(self, x: np.ndarray, iterations: int = 2) -> dict:
        """Time per layer type for one batch: {"by_type": {type: ms}, "by_exec": {"type [kernel]": ms},
        "total_ms"}; only engines that count per layer provide it."""
        raise ArcdeployError(f"the {self.engine_name} engine does not report per-layer timings")

    def optimal_in_flight(self) -> int:
        """How many requests in flight give the best throughput (1 unless the engine knows better)."""
        return 1

    @classmethod
    def options_for(cls, throughput: bool, requests: int | None = None) -> dict[str, Any]:
        """Engine options (for :func:`arcdeploy.load`) that set a runtime up for a latency run or a
        throughput run with ``requests`` in flight (None: the engine's choice). None by default."""
        return {}

    def in_flight_how(self) -> str:
        """How this runtime keeps several requests in flight, in words (a benchmark records it)."""
        return f"{self.engine_name} threads"

    @abstractmethod
    def describe(self) -> RuntimeInfo:
        """What is running: device, executed precision, threads, streams, library version."""

    def close(self) -> None:  # noqa: B027 - optional: most runtimes free everything when collected
        """Free the engine's resources (optional)."""


@dataclass(frozen=True)
class Engine:
    """One engine: its name, what it needs installed, its capabilities and entry points.

    ``build(job)`` writes a package's engine files; ``runtime`` opens them;
    ``open_graph(path, threads)`` runs any ONNX file; ``check(precision)`` fails early,
    before any work, with a one-line reason when this machine cannot build it;
    ``reverter(job)`` serves the accuracy-aware int8 fallback (:mod:`arcdeploy.fallback`).
    """

    name: str
    requirement: str  # pip requirement that provides the library
    module: str  # the library's import name
    capabilities: Capabilities
    build: Callable[[BuildJob], None]
    runtime: type[Runtime]
    open_graph: Callable[..., GraphSession] | None = None
    check: Callable[[Precision], None] | None = None
    describe_library: Callable[[], str] | None = None
    # an int8 build's layers put back in float one by one, for the accuracy-aware fallback:
    # reverter(job) -> object with layers() -> [names], embed(names, x) -> float32 [N, D] and
    # runner(names) -> (inputs -> every output), the model with those layers back in float
    reverter: Callable[[BuildJob], Any] | None = None

    def check_precision(self, precision: Precision) -> None:
        if precision not in self.capabilities.precisions:
            raise ArcdeployError(f"engine {self.name} has no {precision} build")
        if self.check is not None:
            self.check(precision)
