"""arcdeploy serve under load: throughput and latency by concurrent clients, against offline embed and
against the same server with --max-batch 1 (no batching across requests).

    python benchmarks/bench_serve.py [--real ../shared/real] [--work DIR] [--clients 1,8,32,128]
                                     [--duration 6] [--precisions fp32,int8] [--json FILE]

Material: the real trained ``models/w600k_mbf.onnx`` built as OpenVINO fp32 and int8 packages (int8
calibrated on ``faces/lfw`` with its landmarks; built into ``--work`` unless already there); two
workloads, each request carrying one image:

- ``crop``: a 112x112 aligned crop (JPEG q95, as insightface's .bin sets store them) of one of 256
  real LFW faces, ``aligned=true``;
- ``photo``: one of the 12 real photos (204x244 to 1024x1305 pixels), its largest face found by
  SCRFD-500M, aligned and embedded.

Per package, two servers run side by side (``arcdeploy serve`` in child processes on 127.0.0.1,
ephemeral ports): the default (batching across requests, ``--max-batch`` from the package) and
``--max-batch 1``. For each workload and each client count, the two are loaded in turn (their order
alternates), ``--duration`` seconds each after a one-second warm-up; between the two offline runs
that open and close each workload, so a busy spell on this shared machine falls on all alike.

- offline: ``arcdeploy embed``'s own function (``embed_files``, output to a file, as the command
  runs) on the same files (crops listed 4 times, photos 20 times) in a child process, timed after
  the package has loaded;
- load generator: N clients, each one keep-alive HTTP/1.1 connection sending its next request as
  soon as the answer is in (closed loop). It is a few lines of asyncio over prepared request bytes,
  not an HTTP library, so that its own CPU use (recorded) takes as little as possible from the
  server on a 2-core machine; every answer's status is checked and the first of each run parsed.

- engine alone: the package's ``infer`` on the decoded crops at batch 1 and at the server's
  ``--max-batch``, in turns in a child process: how much more an engine call of many faces gives than
  one of one face. Batching across requests gains that inside the engine, and besides it only the
  per-call work a batch shares (the hand-off to the engine thread, the output copy).

Where the time goes (the batching server at 32 clients): CPU seconds per request of the server's
threads, read from /proc before and after the run: the event-loop thread (HTTP parsing, multipart,
JSON encoding, the batcher), the preparation workers (decode, detection, alignment; threads named
arcdeploy-prep), and the rest (the engine's thread and OpenVINO's worker threads); the load
generator's CPU; and the server's own metrics (mean faces per engine call, engine seconds).
Written as a table and as ``results/serve.json`` beside this script.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
DEFAULT_REAL = HERE.parent / ".." / "shared" / "real"
N_CROPS = 256
BOUNDARY = "arcdeploybenchboundary"
MAX_REQUESTS_PER_RUN = 20000  # a bound besides the duration


# ------------------------------------------------------------------ material


def build_packages(real: Path, work: Path, precisions: list[str]) -> dict[str, Path]:
    import arcdeploy

    out = {}
    onnx = real / "models" / "w600k_mbf.onnx"
    for precision in precisions:
        path = work / f"w600k_mbf_ov_{precision}"
        if not (path / "manifest.json").exists():
            print(f"building {path.name} ...", file=sys.stderr)
            kwargs: dict = {}
            if precision == "int8":
                kwargs = {"calib": real / "faces" / "lfw", "calib_landmarks": real / "faces" / "lfw_5pts.txt"}
            else:
                kwargs = {"check_images": real / "faces" / "photos"}
            arcdeploy.build(onnx, path, engine="openvino", precision=precision, **kwargs)
        out[precision] = path
    return out


def make_crops(real: Path, work: Path) -> list[Path]:
    import cv2

    from arcdeploy.faces.io import list_images
    from arcdeploy.faces.landmarks import read_landmarks
    from arcdeploy.faces.prepare import prepare_face

    folder = work / "crops"
    folder.mkdir(parents=True, exist_ok=True)
    lfw = real / "faces" / "lfw"
    table = read_landmarks(real / "faces" / "lfw_5pts.txt")
    sources = list_images(lfw)
    step = max(1, len(sources) // N_CROPS)
    paths = []
    for i, src in enumerate(sources[::step][:N_CROPS]):
        path = folder / f"{i:03d}.jpg"
        if not path.exists():
            crop = prepare_face(src, table.find(src, lfw))
            cv2.imwrite(str(path), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        paths.append(path)
    return paths


# ------------------------------------------------------------------ offline embed (child process)


def offline_child(package: str, listing: str, detector: str | None, threads: int | None) -> None:
    import arcdeploy
    from arcdeploy.faces.pipeline import embed_files

    paths = [Path(p) for p in Path(listing).read_text().split("\n") if p]
    pkg = arcdeploy.load(package, threads=threads)
    embed_files(pkg, paths[:64], detector=detector, progress=False)  # load and warm up
    with tempfile.TemporaryDirectory() as tmp:
        t0, cpu0 = time.perf_counter(), time.process_time()
        res = embed_files(pkg, paths, detector=detector, progress=False, output=Path(tmp) / "feats.npy", force=True)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(json.dumps({"images": len(paths), "failed": len(res.failures), "seconds": seconds, "cpu_s": cpu}))


def offline(package: Path, paths: list[Path], detector: Path | None, work: Path, threads: int | None) -> dict:
    listing = work / "offline_list.txt"
    listing.write_text("\n".join(str(p) for p in paths) + "\n")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--offline", str(package), str(listing)]
    if detector is not None:
        cmd += ["--offline-detector", str(detector)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=True, timeout=900)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["failed"] == 0, doc
    doc["images_per_s"] = doc["images"] / doc["seconds"]
    doc["cpu_ms_per_image"] = 1000 * doc["cpu_s"] / doc["images"]
    return doc


# ------------------------------------------------------------------ the engine alone (child process)


def engine_child(package: str, listing: str, max_batch: int, threads: int | None) -> None:
    """The package's own engine on decoded, aligned crops at batch 1 and at ``max_batch``, in turns:
    what batching gains inside the engine, with no HTTP, decoding or queueing around it."""
    import arcdeploy
    from arcdeploy.engines.base import StopRule, time_calls
    from arcdeploy.faces.io import read_image

    faces = np.stack([read_image(Path(p)) for p in Path(listing).read_text().split("\n") if p])
    pkg = arcdeploy.load(package, threads=threads)
    runs: dict[int, list[tuple[float, float]]] = {1: [], max_batch: []}
    for batch in runs:
        pkg.infer(faces[:batch])  # load and warm up
    for _ in range(3):
        for batch in runs:
            cpu0 = time.process_time()
            lat, wall = time_calls(lambda x=faces[:batch]: pkg.infer(x), 0, StopRule(None, 1.5))
            n = len(lat) * batch
            runs[batch].append((n / wall, 1000 * (time.process_time() - cpu0) / n))
    print(
        json.dumps(
            {
                str(b): {"images_per_s": max(r[0] for r in rs), "cpu_ms_per_image": min(r[1] for r in rs)}
                for b, rs in runs.items()
            }
        )
    )


def engine_alone(package: Path, crops: list[Path], max_batch: int, work: Path, threads: int | None) -> dict:
    listing = work / "engine_list.txt"
    listing.write_text("\n".join(str(p) for p in crops) + "\n")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--engine-alone", str(package), str(listing)]
    cmd += ["--engine-batch", str(max_batch)] + (["--threads", str(threads)] if threads is not None else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=True, timeout=300)
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    one, many = doc["1"], doc[str(max_batch)]
    return {
        "max_batch": max_batch,
        "batch_1": one,
        "batch_max": many,
        "gain_images_per_s": many["images_per_s"] / one["images_per_s"],
        "gain_cpu_per_image": one["cpu_ms_per_image"] / many["cpu_ms_per_image"],
    }


# ------------------------------------------------------------------ servers


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Server:
    def __init__(self, package: Path, detector: Path, *extra: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "arcdeploy", "serve", str(package), "--detector", str(detector), "--port", "0"]
            + list(extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=_env(),
        )
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        m = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(m.group(1))
        self.extra = extra
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status, _ = asyncio.run(_get(self.port, "/healthz"))
            if status == 200:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("server not ready")

    def metrics(self) -> str:
        return asyncio.run(_get(self.port, "/metrics"))[1].decode()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def scheduled(pid: int) -> tuple[float, float]:
    """Seconds the process's threads ran on a CPU and waited, runnable, for one (/proc schedstat)."""
    ran = waited = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            r, w, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
        except (OSError, ValueError):
            continue
        ran, waited = ran + r, waited + w
    return ran / 1e9, waited / 1e9


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of the process's threads: the event loop (the main thread), the preparation
    workers, the rest (engine)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {"event_loop": 0.0, "prepare": 0.0, "engine_and_other": 0.0}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        key = (
            "event_loop" if int(tid) == pid else "prepare" if comm.startswith("arcdeploy-prep") else "engine_and_other"
        )
        out[key] += seconds
    return out


# ------------------------------------------------------------------ load generator


def request_bytes(path: Path, aligned: bool) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + path.read_bytes()
        + b"\r\n"
    ]
    if aligned:
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="aligned"\r\n\r\ntrue\r\n'.encode())
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    head = (
        "POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-length":
            length = int(value.strip())
    return status, await reader.readexactly(length)


async def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return 0, b""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    try:
        return await _read_response(reader)
    finally:
        writer.close()


async def _load(port: int, requests: list[bytes], clients: int, warmup: float, duration: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    counter = [0]
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    first: list[bytes] = []

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                now = time.perf_counter()
                if now >= t_end or len(latencies) >= MAX_REQUESTS_PER_RUN:
                    return
                req = requests[counter[0] % len(requests)]
                counter[0] += 1
                writer.write(req)
                await writer.drain()
                status, body = await _read_response(reader)
                done = time.perf_counter()
                if status != 200:
                    errors.append(f"HTTP {status}: {body[:120]!r}")
                elif not first:
                    first.append(body)
                if t_measure <= done <= t_end:  # answered in the window (asked at any time after the start)
                    latencies.append(done - now)
        finally:
            writer.close()

    cpu0 = time.process_time()
    await asyncio.gather(*(client(k) for k in range(clients)))
    client_cpu = time.process_time() - cpu0
    answer = json.loads(first[0]) if first else {}
    ok = bool(answer) and all(r["error"] is None and len(r["faces"]) == 1 for r in answer["results"])
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "errors": len(errors),
        "error_sample": errors[:3],
        "answer_checked": ok,
        "throughput": len(lat) / duration,
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else None,
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "client_cpu_s": client_cpu,
    }


def measure(server: Server, requests: list[bytes], clients: int, duration: float, detail: bool) -> dict:
    before = server.metrics()
    cpu_before = thread_cpu(server.proc.pid)
    sched_before, t0 = scheduled(server.proc.pid), time.perf_counter()
    result = asyncio.run(_load(server.port, requests, clients, 1.0, duration))
    sched_after, elapsed = scheduled(server.proc.pid), time.perf_counter() - t0
    # how much of the machine the server got: cores it ran on, and its threads' wait for a CPU
    result["server_on_cpu_cores"] = (sched_after[0] - sched_before[0]) / elapsed
    result["server_waiting_for_cpu"] = (sched_after[1] - sched_before[1]) / elapsed
    served_all = _metric(server.metrics(), "arcdeploy_faces_total") - _metric(before, "arcdeploy_faces_total")
    cpu_all = sum(thread_cpu(server.proc.pid).values()) - sum(cpu_before.values())
    # server CPU per answered request (warm-up included on both sides): robust to how much of the
    # shared machine the run got, unlike req/s
    result["server_cpu_ms_per_request"] = 1000 * cpu_all / max(1.0, served_all)
    if detail:
        after = server.metrics()
        cpu_after = thread_cpu(server.proc.pid)
        n = max(1, result["requests"])

        def delta(name: str) -> float:
            return _metric(after, name) - _metric(before, name)

        calls = delta("arcdeploy_batch_size_count")
        # the CPU counters cover warm-up and measurement alike: per request (one face each) of both
        served = max(1.0, delta("arcdeploy_faces_total"))
        result["time_per_request_ms"] = {
            "server_event_loop_cpu": 1000 * (cpu_after["event_loop"] - cpu_before["event_loop"]) / served,
            "server_prepare_cpu": 1000 * (cpu_after["prepare"] - cpu_before["prepare"]) / served,
            "server_engine_and_other_cpu": 1000
            * (cpu_after["engine_and_other"] - cpu_before["engine_and_other"])
            / served,
            "engine_wall": 1000 * delta("arcdeploy_engine_seconds_sum") / served,
            "prepare_wall": 1000 * delta("arcdeploy_prepare_seconds_sum") / served,
            "load_generator_cpu": 1000 * result["client_cpu_s"] / n,
        }
        result["faces_per_engine_call"] = delta("arcdeploy_batch_size_sum") / calls if calls else None
    return result


# ------------------------------------------------------------------ the run


def run(args) -> dict:
    from arcdeploy.machine import cpu_flags, machine_info

    real = args.real.resolve()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    detector = real / "models" / "scrfd_500m_kps.onnx"
    packages = build_packages(real, work, args.precisions)
    crops = make_crops(real, work)
    photos = sorted((real / "faces" / "photos").rglob("*.*"))
    photos = [p for p in photos if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    workloads = {
        "crop": ([request_bytes(p, True) for p in crops], crops * 4, None),
        "photo": ([request_bytes(p, False) for p in photos], photos * 20, detector),
    }
    doc: dict = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench_serve.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "machine": {**machine_info(), "all_flags": sorted(cpu_flags())},
        "load_average_start": list(os.getloadavg()),
        "duration_s": args.duration,
        "nice": os.nice(0),
        "engine_threads": args.threads,
        "engine_streams": args.engine_streams or 1,
        "clients": args.clients,
        "results": [],
    }
    common = ["--threads", str(args.threads)] if args.threads else []
    streams = ["--engine-streams", str(args.engine_streams)] if args.engine_streams else []
    for precision, pkg in packages.items():
        batched = Server(pkg, detector, *common, *streams)
        single = Server(pkg, detector, "--max-batch", "1", *common)
        try:
            model = json.loads(asyncio.run(_get(batched.port, "/v1/model"))[1])
            ceiling = engine_alone(pkg, crops, model["serving"]["max_batch"], work, args.threads)
            print(
                f"{precision} engine alone: batch {ceiling['max_batch']} / batch 1 = "
                f"{ceiling['gain_images_per_s']:.2f}x img/s, {ceiling['gain_cpu_per_image']:.2f}x CPU per image",
                file=sys.stderr,
            )
            for name, (requests, files, det) in workloads.items():
                entry: dict = {
                    "package": f"w600k_mbf openvino {precision}",
                    "workload": name,
                    "max_batch": model["serving"]["max_batch"],
                    "max_wait_ms": model["serving"]["max_wait_ms"],
                    "workers": model["serving"]["workers"],
                    "offline": [],
                    "batched": [],
                    "max_batch_1": [],
                    "engine_alone": ceiling,
                }
                entry["offline"].append(offline(pkg, files, det, work, args.threads))
                print(f"{precision} {name}: offline {entry['offline'][-1]['images_per_s']:.1f} img/s", file=sys.stderr)
                for i, clients in enumerate(args.clients):
                    order = [("batched", batched), ("max_batch_1", single)]
                    for key, server in order if i % 2 == 0 else order[::-1]:
                        r = measure(server, requests, clients, args.duration, detail=key == "batched" and clients == 32)
                        entry[key].append(r)
                        print(
                            f"{precision} {name} {key} {clients} clients: {r['throughput']:.1f} req/s, "
                            f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}, "
                            f"server CPU {r['server_cpu_ms_per_request']:.1f} ms/req, on CPU "
                            f"{r['server_on_cpu_cores']:.2f} cores, waiting {r['server_waiting_for_cpu']:.2f}",
                            file=sys.stderr,
                        )
                entry["offline"].append(offline(pkg, files, det, work, args.threads))
                off = statistics.mean(o["images_per_s"] for o in entry["offline"])
                entry["offline_images_per_s"] = off
                by = {r["clients"]: r for r in entry["batched"]}
                one = {r["clients"]: r for r in entry["max_batch_1"]}
                if 32 in by:
                    entry["at_32"] = {
                        "to_offline": by[32]["throughput"] / off,
                        "to_max_batch_1": by[32]["throughput"] / one[32]["throughput"],
                    }
                if 8 in by:
                    entry["at_8_p99_to_p50"] = by[8]["p99_ms"] / by[8]["p50_ms"]
                doc["results"].append(entry)
        finally:
            rcs = [batched.stop(), single.stop()]
            assert rcs == [0, 0], rcs
    doc["load_average_end"] = list(os.getloadavg())
    return doc


def _gain(entry: dict, key: str) -> str:
    ceiling = entry.get("engine_alone")
    return f"{ceiling[key]:.2f} (batch {ceiling['max_batch']})" if ceiling else "-"


def table(doc: dict) -> str:
    lines = [
        "| package | workload | clients | batched req/s | p50 ms | p99 ms | CPU ms/req | cores got "
        "| max-batch 1 req/s | p50 ms | p99 ms | CPU ms/req | cores got | req/s ratio | CPU/req ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in doc["results"]:
        one = {r["clients"]: r for r in e["max_batch_1"]}
        for r in e["batched"]:
            o = one[r["clients"]]
            lines.append(
                f"| {e['package']} | {e['workload']} | {r['clients']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} "
                f"| {r['p99_ms']:.0f} | {r['server_cpu_ms_per_request']:.1f} | {r['server_on_cpu_cores']:.2f} "
                f"| {o['throughput']:.1f} | {o['p50_ms']:.0f} | {o['p99_ms']:.0f} "
                f"| {o['server_cpu_ms_per_request']:.1f} | {o['server_on_cpu_cores']:.2f} "
                f"| {r['throughput'] / o['throughput']:.2f} "
                f"| {o['server_cpu_ms_per_request'] / r['server_cpu_ms_per_request']:.2f} |"
            )
    lines += [
        "",
        "| package | workload | offline embed img/s (before, after) | offline CPU ms/img | batched at 32 / offline, "
        "req/s | same, per CPU second | engine alone: max batch / batch 1, img/s | same, CPU per image |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in doc["results"]:
        runs = ", ".join(f"{o['images_per_s']:.1f}" for o in e["offline"])
        cpu = statistics.mean(o["cpu_ms_per_image"] for o in e["offline"])
        r32 = next((r for r in e["batched"] if r["clients"] == 32), None)
        wall = f"{r32['throughput'] / e['offline_images_per_s']:.2f}" if r32 else "-"
        per_cpu = f"{cpu / r32['server_cpu_ms_per_request']:.2f}" if r32 else "-"
        lines.append(
            f"| {e['package']} | {e['workload']} | {e['offline_images_per_s']:.1f} ({runs}) | {cpu:.1f} | {wall} "
            f"| {per_cpu} | {_gain(e, 'gain_images_per_s')} | {_gain(e, 'gain_cpu_per_image')} |"
        )
    lines += [
        "",
        "| package | workload | faces per engine call | event loop | prepare | engine + other | engine wall "
        "| load generator |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in doc["results"]:
        r = next((r for r in e["batched"] if "time_per_request_ms" in r), None)
        if r:
            t = r["time_per_request_ms"]
            lines.append(
                f"| {e['package']} | {e['workload']} | {r['faces_per_engine_call']:.1f} "
                f"| {t['server_event_loop_cpu']:.2f} | {t['server_prepare_cpu']:.2f} "
                f"| {t['server_engine_and_other_cpu']:.2f} | {t['engine_wall']:.2f} | {t['load_generator_cpu']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=DEFAULT_REAL)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "arcdeploy-bench-serve")
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds measured per run (after 1 s of warm-up)")
    ap.add_argument("--precisions", default="fp32,int8")
    ap.add_argument("--threads", type=int, default=None, help="engine threads of every runner (default: the engine's)")
    ap.add_argument(
        "--engine-streams", type=int, default=None, help="the batching server's --engine-streams (default 1)"
    )
    ap.add_argument("--json", type=Path, default=HERE / "results" / "serve.json")
    ap.add_argument("--offline", nargs=2, metavar=("PKG", "LIST"), help=argparse.SUPPRESS)
    ap.add_argument("--offline-detector", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--engine-alone", nargs=2, metavar=("PKG", "LIST"), help=argparse.SUPPRESS)
    ap.add_argument("--engine-batch", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(SRC))
    if args.offline:
        offline_child(args.offline[0], args.offline[1], args.offline_detector, args.threads)
        return 0
    if args.engine_alone:
        engine_child(args.engine_alone[0], args.engine_alone[1], args.engine_batch, args.threads)
        return 0
    args.clients = [int(c) for c in args.clients.split(",")]
    args.precisions = args.precisions.split(",")
    doc = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=1) + "\n")
    m = doc["machine"]
    print(
        f"CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; {', '.join(m['flags'])}); shared machine, load "
        f"{doc['load_average_start']} -> {doc['load_average_end']}"
    )
    print(table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
