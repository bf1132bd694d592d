"""Speed of a package, like a vendor's ``mm_run`` or OpenVINO's ``benchmark_app``.

``bench(PKG)`` loads the package (timing load + compile and the first
inference), warms up, then for each batch size runs the model on synthetic
aligned faces and reports throughput (images/s) and latency (mean, p50, p90,
p95, p99 in ms), with the peak resident memory and the machine it ran on.

What is timed: the engine on a batch already in the package's input format
(model time, as benchmark_app measures it); the uint8 -> float conversion is
done once beforehand. ``e2e`` times the whole path instead: decode + align +
infer on real image files through :mod:`arcdeploy.faces.pipeline`.

Modes: ``latency`` runs one request at a time. ``throughput`` keeps several
requests in flight (OpenVINO ``AsyncInferQueue``) when the engine exposes a
compiled OpenVINO model; other engines run synchronously and say so.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import numpy as np

from .errors import ArcdeployError
from .utils import cpu_flags, cpu_name, library_versions

DEFAULT_BATCHES = (1, 8, 32)
DEFAULT_WARMUP = 2
# when neither iterations nor duration is given: run each batch size this long ...
DEFAULT_DURATION_S = 3.0
# ... but at least this many timed runs, so percentiles mean something
MIN_ITERATIONS = 3
MODES = ("latency", "throughput")
# the instruction-set features that decide which kernels int8 / bf16 / fp32 can use
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                  "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
PERCENTILES = (50, 90, 95, 99)


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


def machine_info() -> dict:
    flags = cpu_flags()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {"cpu": cpu_name(), "logical_cpus": usable,
            "flags": [f for f in RELEVANT_FLAGS if f in flags]}


# ---- memory -------------------------------------------------------------------------

def _status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float | None:
    kb = _status_kb("VmHWM")
    if kb is None:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024


# ---- inputs and runners ---------------------------------------------------------------

def _faces(n: int) -> np.ndarray:
    """``n`` aligned synthetic faces; only 16 distinct ones are drawn, then tiled."""
    from .synth import aligned_faces

    base = aligned_faces(min(n, 16), seed=11)
    reps = -(-n // base.shape[0])
    return np.ascontiguousarray(np.tile(base, (reps, 1, 1, 1))[:n])


def _ov_compiled_model(engine):
    """The engine's compiled OpenVINO model, if it exposes one (for async requests)."""
    for attr in ("compiled_model", "compiled"):
        cm = getattr(engine, attr, None)
        if cm is not None and hasattr(cm, "create_infer_request"):
            return cm
    return None


class _StopRule:
    """When a timed loop stops: after ``iterations`` runs, or once ``duration`` seconds
    have passed (with at least ``min_runs`` runs)."""

    def __init__(self, iterations: int | None, duration: float, min_runs: int):
        self.iterations, self.duration, self.min_runs = iterations, duration, max(min_runs, 1)

    def done(self, runs: int, t_start: float) -> bool:
        if self.iterations is not None:
            return runs >= self.iterations
        return runs >= self.min_runs and time.perf_counter() - t_start >= self.duration


def _run_sync(fn, warmup: int, stop: _StopRule) -> tuple[list[float], float]:
    for _ in range(warmup):
        fn()
    lat = []
    t0 = time.perf_counter()
    while not stop.done(len(lat), t0):
        s = time.perf_counter()
        fn()
        lat.append((time.perf_counter() - s) * 1e3)
    return lat, time.perf_counter() - t0


def _run_async(compiled, x: np.ndarray, jobs: int, warmup: int, stop: _StopRule) -> tuple[list[float], float]:
    """Keep ``jobs`` requests in flight; latency of each request from its start to its callback."""
    import openvino as ov

    queue = ov.AsyncInferQueue(compiled, jobs)
    lat: list[float] = []
    queue.set_callback(lambda request, started: lat.append((time.perf_counter() - started) * 1e3))
    inputs = {0: x}
    for _ in range(max(warmup, 1) * jobs):
        queue.start_async(inputs, time.perf_counter())
    queue.wait_all()
    lat.clear()
    started = 0
    t0 = time.perf_counter()
    while not stop.done(started, t0):
        queue.get_idle_request_id()  # wait for a free request, so its latency excludes queueing
        queue.start_async(inputs, time.perf_counter())
        started += 1
    queue.wait_all()
    return list(lat), time.perf_counter() - t0


# ---- e2e ------------------------------------------------------------------------------

def _e2e_inputs(source) -> tuple[list, Path | None]:
    """The image paths of ``--e2e`` and their root folder, checked before any timing starts."""
    try:
        from .faces.io import images_root, list_images
    except ImportError:
        raise ArcdeployError("--e2e needs arcdeploy.faces.pipeline, which this build does not have") from None
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
    aligned = "5-point alignment from the landmark file" if landmarks is not None else "no landmarks: images taken as aligned crops"
    return {"images": n, "failed": len(res.failures), "batch": batch, "wall_s": wall,
            "throughput": n / wall, "ms_per_image": wall * 1e3 / n,
            "what": f"decode + align + preprocess + infer (arcdeploy.faces.pipeline.embed_files; {aligned})"}


# ---- the benchmark --------------------------------------------------------------------

def bench(package_or_path, batches=DEFAULT_BATCHES, iterations: int | None = None, duration: float | None = None,
          warmup: int = DEFAULT_WARMUP, threads: int | None = None, streams: int | None = None,
          mode: str = "latency", e2e=None, e2e_landmarks=None, log=None) -> dict:
    """Benchmark a package; returns the JSON form (SPEC section 9) with details.

    ``package_or_path``: a package folder or a loaded :class:`arcdeploy.package.Package`.
    ``iterations`` or ``duration`` (seconds) per batch size, not both; with
    neither, each batch size runs ~3 s (at least 3 timed runs).
    ``streams``: requests in flight in throughput mode (default: the engine's
    optimal number). ``e2e``: image folder / list file / list of paths to
    time end to end (with ``e2e_landmarks``, a landmark file, they are
    aligned). ``log``: a callable receiving one line per batch size done.
    """
    from .package import Package, load

    batches = parse_batches(batches)
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
    iterations = int(iterations) if iterations is not None else None
    # an explicit --duration is obeyed even if it allows fewer than MIN_ITERATIONS runs
    stop = _StopRule(iterations, float(duration) if duration is not None else DEFAULT_DURATION_S,
                     1 if duration is not None else MIN_ITERATIONS)

    e2e_paths, e2e_root = _e2e_inputs(e2e) if e2e is not None else (None, None)
    if e2e_landmarks is not None and not Path(e2e_landmarks).exists():
        raise ArcdeployError(f"{e2e_landmarks}: no such landmark file")

    rss_reset = _reset_peak_rss()
    rss_before = (_status_kb("VmRSS") or 0) / 1024
    t0 = time.perf_counter()
    if isinstance(package_or_path, Package):
        pkg = package_or_path
        if threads is not None and threads != pkg.threads:
            raise ArcdeployError("threads: pass threads when loading the package, or give bench a path")
        preloaded = pkg._engine is not None
    else:
        pkg = load(package_or_path, threads=threads)
        if mode == "throughput" and pkg.manifest.get("engine") == "openvino":
            # one CPU stream per request, as benchmark_app -hint throughput compiles it
            pkg.engine_options["performance_hint"] = "THROUGHPUT"
            if streams is not None:
                pkg.engine_options["num_requests"] = int(streams)
        elif pkg.manifest.get("engine") == "openvino":
            pkg.engine_options["performance_hint"] = "LATENCY"
        preloaded = False
    try:
        engine = pkg.engine
    except ArcdeployError:
        raise
    except Exception as exc:
        raise ArcdeployError(f"{pkg.path}: engine failed to load ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    load_ms = None if preloaded else (time.perf_counter() - t0) * 1e3

    from .faces.preprocess import to_model_input

    max_batch = max(batches)
    faces = _faces(max_batch)
    fixed = pkg.fixed_batch
    t1 = time.perf_counter()
    pkg.infer(faces[: fixed or 1])
    first_ms = (time.perf_counter() - t1) * 1e3

    compiled = _ov_compiled_model(engine) if mode == "throughput" else None
    jobs = 1
    if compiled is not None:
        if streams is not None:
            jobs = int(streams)
        else:
            with contextlib.suppress(Exception):
                jobs = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        jobs = max(jobs, 1)
    if mode == "throughput":
        streams_note = "1 (engine has no async)"
        if compiled is not None:
            streams_note = f"{jobs} async request(s) in flight"
            with contextlib.suppress(Exception):
                streams_note += f" (OpenVINO NUM_STREAMS {int(compiled.get_property('NUM_STREAMS'))})"
    else:
        streams_note = "1 (latency mode: one request at a time)"

    results = []
    for b in batches:
        fb = faces[:b]
        x = to_model_input(fb, pkg.input_format)
        direct = fixed is None or fixed == b
        how = "engine.infer on prepared input" if direct else f"Package.infer (fixed batch {fixed}: padded/split, includes preprocessing)"
        if compiled is not None and direct:
            lat, wall = _run_async(compiled, x, jobs, int(warmup), stop)
            how = f"OpenVINO AsyncInferQueue, {jobs} requests"
        else:
            fn = (lambda x=x: engine.infer(x)) if direct else (lambda fb=fb: pkg.infer(fb))
            lat, wall = _run_sync(fn, int(warmup), stop)
        n = len(lat)
        row = {"batch": b, "throughput": b * n / wall, "latency_ms": latency_summary(lat),
               "iterations": n, "images": b * n, "wall_s": wall, "how": how}
        results.append(row)
        if log:
            lm = row["latency_ms"]
            log(f"batch {b:>4}: {row['throughput']:9.1f} img/s  p50 {lm['p50']:8.2f} ms  ({n} runs)")

    e2e_result = _bench_e2e(pkg, e2e_paths, e2e_root, e2e_landmarks, max_batch, int(warmup)) if e2e is not None else None
    desc = {}
    with contextlib.suppress(Exception):
        desc = dict(pkg.describe())
    m = pkg.manifest
    engine_threads = desc.get("threads") or threads
    return {
        "results": results,
        "package": str(pkg.path),
        "arch": m.get("arch"),
        "engine": m.get("engine"),
        "precision": m.get("precision"),
        "device": desc.get("device") or m.get("device", "CPU"),
        "threads": engine_threads,
        "threads_note": "as set" if threads else "engine default",
        "mode": mode,
        "streams": jobs if compiled is not None else 1,
        "streams_note": streams_note,
        "warmup": int(warmup),
        "iterations": iterations,
        "duration_s": duration if duration is not None else (None if iterations is not None else DEFAULT_DURATION_S),
        "fixed_batch": fixed,
        "load_ms": load_ms,
        "first_inference_ms": first_ms,
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_note": "process high-water mark since just before loading" if rss_reset else "process high-water mark (includes everything before loading)",
        "what": "model time on a batch already in the package's input format (synthetic aligned faces)",
        "machine": machine_info(),
        "engine_info": desc,
        "versions": library_versions("arcdeploy", "numpy", "openvino", "onnxruntime", "torch"),
        "e2e": e2e_result,
    }


def format_report(res: dict) -> str:
    """A benchmark_app-style summary of :func:`bench`'s result."""
    mach = res["machine"]
    lines = [
        f"[ INFO ] Package       {res['package']}",
        f"[ INFO ] Model         {res.get('arch')}  engine {res['engine']}  precision {res['precision']}  device {res['device']}",
        f"[ INFO ] CPU           {mach['cpu']}  ({mach['logical_cpus']} logical CPUs; {' '.join(mach['flags']) or 'no AVX2'})",
        f"[ INFO ] Threads       {res['threads'] if res['threads'] else 'engine default'}"
        + ("" if res['threads_note'] == "as set" else " (engine default)" if res['threads'] else ""),
        f"[ INFO ] Mode          {res['mode']};  streams: {res['streams_note']}",
    ]
    if res["load_ms"] is not None:
        lines.append(f"[ INFO ] Load+compile  {res['load_ms']:.1f} ms")
    lines.append(f"[ INFO ] First infer   {res['first_inference_ms']:.1f} ms")
    lines.append(f"[ INFO ] Peak RSS      {res['peak_rss_mb']:.0f} MB  (before load {res['rss_before_load_mb']:.0f} MB)")
    lines.append(f"[ INFO ] Measured      {res['what']}")
    lines.append("")
    hdr = f"{'batch':>6} {'runs':>6} {'throughput':>12} {'mean':>9} {'p50':>9} {'p90':>9} {'p95':>9} {'p99':>9}"
    lines.append(hdr)
    lines.append(f"{'':>6} {'':>6} {'(img/s)':>12} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9} {'(ms)':>9}")
    for r in res["results"]:
        lm = r["latency_ms"]
        lines.append(f"{r['batch']:>6} {r['iterations']:>6} {r['throughput']:>12.1f} {lm['mean']:>9.2f} {lm['p50']:>9.2f} "
                     f"{lm['p90']:>9.2f} {lm['p95']:>9.2f} {lm['p99']:>9.2f}")
    e2e = res.get("e2e")
    if e2e:
        lines.append("")
        lines.append(f"[ INFO ] End to end    {e2e['images']} images at batch {e2e['batch']}: {e2e['throughput']:.1f} img/s, "
                     f"{e2e['ms_per_image']:.2f} ms/image ({e2e['what']})")
    return "\n".join(lines)
