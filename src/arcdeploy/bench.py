"""Speed of a package, like a vendor's ``mm_run`` or OpenVINO's ``benchmark_app``.

``bench(PKG)`` loads the package (timing load + compile and the first inference),
warms up, then for each batch size runs the model and reports throughput (images/s)
and latency (mean, p50, p90, p95, p99 in ms), with the peak resident memory and the
machine it ran on. The runner here only decides what to time; how requests are kept
in flight belongs to the engine's runtime (``Runtime.timed_runs``); the text report is
:func:`format_report`.

What is timed: the engine on a batch already in the package's input format (model
time, as benchmark_app measures it). ``e2e`` times the whole path instead: decode +
align + infer on real image files through :mod:`arcdeploy.faces.pipeline`.

Modes: ``latency`` runs one request at a time; ``throughput`` keeps several requests
in flight, as the engine's runtime does it (:meth:`Runtime.options_for` sets it up,
:meth:`Runtime.timed_runs` runs it, :meth:`Runtime.in_flight_how` says how).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from .engines import StopRule, get_engine
from .engines.base import time_calls
from .errors import ArcdeployError
from .machine import machine_info
from .utils import library_versions

DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_WARMUP = 2
# when neither iterations nor duration is given: run each batch size this long ...
DEFAULT_DURATION_S = 3.0
# ... but at least this many timed runs, so percentiles mean something
MIN_ITERATIONS = 3
MODES = ("latency", "throughput")
PERCENTILES = (50, 90, 95, 99)
INPUT_SEED = 11
# what the peak RSS covers: whether the kernel's high-water mark could be reset before loading
PEAK_RSS_NOTES = {
    True: "process high-water mark since just before loading",
    False: "process high-water mark (includes everything before loading)",
}


def parse_batches(text: str | int | list | tuple) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; anything but positive integers is an error."""
    items = text if isinstance(text, (list, tuple)) else [text] if isinstance(text, int) else str(text).split(",")
    out = []
    for item in items:
        s = str(item).strip()
        try:
            value = int(s)
        except ValueError:
            raise ArcdeployError(f"--batch {text!s}: {s!r} is not an integer (expected e.g. 1,8,32)") from None
        if value < 1:
            raise ArcdeployError(f"--batch {text!s}: batch sizes must be >= 1, got {value}")
        out.append(value)
    if not out:
        raise ArcdeployError("--batch: no batch sizes given (expected e.g. 1,8,32)")
    return out


def latency_summary(latencies_ms) -> dict:
    """Mean, min, max and percentiles (numpy's linear interpolation) of per-request latencies, ms."""
    lat = np.asarray(latencies_ms, dtype=np.float64)
    out = {"mean": float(lat.mean())}
    for q, v in zip(PERCENTILES, np.percentile(lat, PERCENTILES)):
        out[f"p{q}"] = float(v)
    out["min"] = float(lat.min())
    out["max"] = float(lat.max())
    return out


# ---- memory -------------------------------------------------------------------------


def _status_kb(name: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


# ---- results --------------------------------------------------------------------------


@dataclass
class BenchRow:
    batch: int
    throughput: float
    latency_ms: dict
    iterations: int
    images: int
    wall_s: float
    how: str
    breakdown_ms: dict | None = None  # median per run: host-to-device copy, compute, copy back (GPU)

    def to_json(self) -> dict:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> BenchRow:
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


@dataclass
class BenchResult:
    """One package's benchmark; ``to_json`` is the ``--json`` document."""

    results: list[BenchRow]
    package: str
    arch: str
    engine: str
    precision: str
    device: str
    threads: Any
    threads_note: str
    mode: str
    streams: int
    streams_note: str
    warmup: int
    iterations: int | None
    duration_s: float | None
    fixed_batch: int | None
    load_ms: float | None
    first_inference_ms: float
    rss_before_load_mb: float
    peak_rss_mb: float
    peak_rss_note: str
    machine: dict
    engine_info: dict
    versions: dict
    e2e: dict | None = None
    what: str = "model time on a batch already in the package's input format"

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["results"] = [r.to_json() for r in self.results]
        return d

    @classmethod
    def from_json(cls, data: dict) -> BenchResult:
        """A result written by :meth:`to_json` (a run's step result, the ``--json`` file)."""
        known = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        return cls(**{**known, "results": [BenchRow.from_json(r) for r in data["results"]]})


# ---- e2e ------------------------------------------------------------------------------


def _e2e_inputs(source, landmarks=None) -> tuple[list, Path | None]:
    """The image paths of ``--e2e`` and their root folder, checked (with the landmark file) before any
    timing starts."""
    from .faces.io import images_root, list_images

    if landmarks is not None and not Path(landmarks).exists():
        raise ArcdeployError(f"{landmarks}: no such landmark file")
    if isinstance(source, (list, tuple)):
        if not source:
            raise ArcdeployError("--e2e: no images given")
        return list(source), None
    return list_images(source), images_root(source)


def _bench_e2e(pkg, paths, root, landmarks, batch: int, warmup: int) -> dict:
    from .faces.pipeline import embed_files

    if warmup:
        embed_files(pkg, paths[:batch], landmarks=landmarks, batch=batch, progress=False, root=root)
    t0 = time.perf_counter()
    res = embed_files(pkg, paths, landmarks=landmarks, batch=batch, progress=False, root=root)
    wall = time.perf_counter() - t0
    n = len(paths)
    aligned = (
        "5-point alignment from the landmark file"
        if landmarks is not None
        else "no landmarks: images taken as aligned crops"
    )
    return {
        "images": n,
        "failed": len(res.failures),
        "batch": batch,
        "wall_s": wall,
        "throughput": n / wall,
        "ms_per_image": wall * 1e3 / n,
        "what": f"decode + align + preprocess + infer (arcdeploy.faces.pipeline.embed_files; {aligned})",
    }


def timing_faces(n: int) -> np.ndarray:
    """``n`` aligned-crop-shaped inputs for timing (seeded noise: speed does not depend on content)."""
    rng = np.random.default_rng(INPUT_SEED)
    return rng.integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


# ---- the benchmark --------------------------------------------------------------------


def _validate(iterations, duration, warmup, threads, streams, mode) -> None:
    if iterations is not None and duration is not None:
        raise ArcdeployError("give --iterations or --duration, not both")
    if iterations is not None and int(iterations) < 1:
        raise ArcdeployError(f"--iterations must be >= 1, got {iterations}")
    if duration is not None and not float(duration) > 0:
        raise ArcdeployError(f"--duration must be > 0 seconds, got {duration}")
    if warmup is None or int(warmup) < 0:
        raise ArcdeployError(f"--warmup must be >= 0, got {warmup}")
    if threads is not None and int(threads) < 1:
        raise ArcdeployError(f"--threads must be >= 1, got {threads}")
    if streams is not None and int(streams) < 1:
        raise ArcdeployError(f"--streams must be >= 1, got {streams}")
    if mode not in MODES:
        raise ArcdeployError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")


def bench(
    package_or_path,
    batches=DEFAULT_BATCHES,
    iterations: int | None = None,
    duration: float | None = None,
    warmup: int = DEFAULT_WARMUP,
    threads: int | None = None,
    streams: int | None = None,
    mode: str = "latency",
    e2e=None,
    e2e_landmarks=None,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """Benchmark a package.

    ``package_or_path``: a package folder or a loaded :class:`arcdeploy.package.Package`.
    ``iterations`` or ``duration`` (seconds) per batch size, not both; with neither, each
    batch size runs ~3 s (at least 3 timed runs). ``streams``: requests in flight in
    throughput mode (default: the engine's optimal number). ``e2e``: image folder / list
    file / list of paths to time end to end (with ``e2e_landmarks`` they are aligned).
    ``log``: receives one line per batch size done.
    """
    batches = parse_batches(batches)
    _validate(iterations, duration, warmup, threads, streams, mode)
    iterations = int(iterations) if iterations is not None else None
    stop = _stop_rule(iterations, duration)
    e2e_paths, e2e_root = _e2e_inputs(e2e, e2e_landmarks) if e2e is not None else (None, None)

    rss_reset = _reset_peak_rss()
    rss_before = (_status_kb("VmRSS") or 0) / 1024
    pkg, load_ms = _open(package_or_path, threads, mode, streams)
    faces = timing_faces(max(batches))
    t1 = time.perf_counter()
    pkg.infer(faces[: pkg.fixed_batch or 1])
    first_ms = (time.perf_counter() - t1) * 1e3
    in_flight, streams_note = _in_flight(pkg, mode, streams)

    rows = []
    for b in batches:
        row = _time_batch(pkg, faces[:b], in_flight, int(warmup), stop)
        rows.append(row)
        if log:
            p50 = row.latency_ms["p50"]
            log(f"batch {b:>4}: {row.throughput:9.1f} img/s  p50 {p50:8.2f} ms  ({row.iterations} runs)")

    e2e_result = (
        _bench_e2e(pkg, e2e_paths, e2e_root, e2e_landmarks, max(batches), int(warmup)) if e2e is not None else None
    )
    info = pkg.runtime.describe()
    m = pkg.manifest
    return BenchResult(
        results=rows,
        package=str(pkg.path),
        arch=m.arch,
        engine=m.engine,
        precision=m.precision,
        device=info.device or m.device,
        threads=info.threads or threads,
        threads_note="as set" if threads else "engine default",
        mode=mode,
        streams=in_flight,
        streams_note=streams_note,
        warmup=int(warmup),
        iterations=iterations,
        duration_s=duration if duration is not None else (None if iterations is not None else DEFAULT_DURATION_S),
        fixed_batch=pkg.fixed_batch,
        load_ms=load_ms,
        first_inference_ms=first_ms,
        rss_before_load_mb=rss_before,
        peak_rss_mb=_peak_rss_mb(),
        peak_rss_note=PEAK_RSS_NOTES[rss_reset],
        machine=machine_info(),
        engine_info={**{k: v for k, v in info.to_json().items() if k != "details"}, **info.details},
        versions=library_versions("arcdeploy", "numpy", "openvino", "onnxruntime", "torch"),
        e2e=e2e_result,
        what="model time on a batch already in the package's input format (seeded noise inputs)",
    )


def _stop_rule(iterations: int | None, duration: float | None) -> StopRule:
    # an explicit --duration is obeyed even if it allows fewer than MIN_ITERATIONS runs
    return StopRule(
        iterations,
        float(duration) if duration is not None else DEFAULT_DURATION_S,
        1 if duration is not None else MIN_ITERATIONS,
    )


def _open(package_or_path, threads: int | None, mode: str, streams: int | None):
    """The package with its runtime loaded for the mode; (package, load + compile ms; None when
    it was loaded before)."""
    from .package import Package, load

    t0 = time.perf_counter()
    if isinstance(package_or_path, Package):
        pkg = package_or_path
        if threads is not None and threads != pkg.threads:
            raise ArcdeployError("threads: pass threads when loading the package, or give bench a path")
        preloaded = pkg.loaded
    else:
        pkg = load(package_or_path, threads=threads)
        # the engine says how a runtime is set up for this mode (e.g. OpenVINO's streams per request)
        runtime_class = get_engine(pkg.manifest.engine).runtime
        pkg.engine_options.update(runtime_class.options_for(mode == "throughput", streams))
        preloaded = False
    pkg.runtime  # noqa: B018 - loads and compiles it here, inside the timing
    return pkg, None if preloaded else (time.perf_counter() - t0) * 1e3


def _in_flight(pkg, mode: str, streams: int | None) -> tuple[int, str]:
    """How many requests the mode keeps in flight, and that in words."""
    if mode != "throughput":
        return 1, "1 (latency mode: one request at a time)"
    runtime = pkg.runtime
    has_async = get_engine(pkg.manifest.engine).capabilities.async_requests
    in_flight = int(streams) if streams is not None else runtime.optimal_in_flight()
    if streams is None and not has_async:
        return in_flight, "1 (engine has no async)"
    note = f"{in_flight} {'async request(s)' if has_async else 'concurrent request(s)'} in flight"
    info = runtime.describe()
    if info.streams:
        note += f" ({info.engine} streams {info.streams})"
    return in_flight, note


def _time_batch(pkg, faces: np.ndarray, in_flight: int, warmup: int, stop: StopRule) -> BenchRow:
    """One batch size timed: the runtime on prepared input, or (a package compiled for another
    fixed batch) Package.infer, which pads or splits."""
    runtime, fixed, b = pkg.runtime, pkg.fixed_batch, len(faces)
    direct = fixed is None or fixed == b
    if direct:
        x = pkg.to_model_input(faces)
        runtime.last_breakdown = None
        lat, wall = runtime.timed_runs(x, in_flight, warmup, stop)
        how = f"{runtime.in_flight_how()}, {in_flight} requests" if in_flight > 1 else "engine.infer on prepared input"
    else:
        lat, wall = time_calls(functools.partial(pkg.infer, faces), warmup, stop)
        how = f"Package.infer (fixed batch {fixed}: padded/split, includes preprocessing)"
    n = len(lat)
    return BenchRow(
        batch=b,
        throughput=b * n / wall,
        latency_ms=latency_summary(lat),
        iterations=n,
        images=b * n,
        wall_s=wall,
        how=how,
        breakdown_ms=runtime.last_breakdown if direct else None,
    )


def format_report(res: BenchResult | dict) -> str:
    """A benchmark_app-style summary of a :class:`BenchResult`."""
    r = res.to_json() if isinstance(res, BenchResult) else res
    mach = r["machine"]
    lines = [
        f"[ INFO ] Package       {r['package']}",
        f"[ INFO ] Model         {r.get('arch')}  engine {r['engine']}  "
        f"precision {r['precision']}  device {r['device']}",
        f"[ INFO ] CPU           {mach['cpu']}  "
        f"({mach['logical_cpus']} logical CPUs; {' '.join(mach['flags']) or 'no AVX2'})",
        f"[ INFO ] Threads       {r['threads'] if r['threads'] else 'engine default'}"
        + ("" if r["threads_note"] == "as set" else " (engine default)" if r["threads"] else ""),
        f"[ INFO ] Mode          {r['mode']};  streams: {r['streams_note']}",
    ]
    executes = r.get("engine_info", {}).get("executes")
    if executes:
        lines.append(f"[ INFO ] Executes      {executes}")
    if r["load_ms"] is not None:
        lines.append(f"[ INFO ] Load+compile  {r['load_ms']:.1f} ms")
    lines.append(f"[ INFO ] First infer   {r['first_inference_ms']:.1f} ms")
    lines.append(f"[ INFO ] Peak RSS      {r['peak_rss_mb']:.0f} MB  (before load {r['rss_before_load_mb']:.0f} MB)")
    lines.append(f"[ INFO ] Measured      {r['what']}")
    lines.append("")
    lines.append(f"{'batch':>6} {'runs':>6} {'throughput':>12} {'mean':>9} {'p50':>9} {'p90':>9} {'p95':>9} {'p99':>9}")
    lines.append(f"{'':>6} {'':>6} {'(img/s)':>12} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9}")
    for row in r["results"]:
        lm = row["latency_ms"]
        lines.append(
            f"{row['batch']:>6} {row['iterations']:>6} {row['throughput']:>12.1f} {lm['mean']:>9.2f} {lm['p50']:>9.2f} "
            f"{lm['p90']:>9.2f} {lm['p95']:>9.2f} {lm['p99']:>9.2f}"
        )
    split = [row for row in r["results"] if row.get("breakdown_ms")]
    if split:
        lines.append("")
        lines.append("[ INFO ] Per run (median): host->device copy / compute / device->host copy, ms")
        for row in split:
            bd = row["breakdown_ms"]
            lines.append(f"{row['batch']:>6}  {bd['h2d']:9.3f} / {bd['compute']:9.3f} / {bd['d2h']:9.3f}")
    e2e = r.get("e2e")
    if e2e:
        lines.append("")
        lines.append(
            f"[ INFO ] End to end    {e2e['images']} images at batch {e2e['batch']}: {e2e['throughput']:.1f} img/s, "
            f"{e2e['ms_per_image']:.2f} ms/image ({e2e['what']})"
        )
    return "\n".join(lines)
