"""Compose ``benchmarks/RESULTS.md`` from the JSON results the benchmark scripts wrote.

    python benchmarks/write_results.py [--results benchmarks/results] [--out benchmarks/RESULTS.md]

Sections, each from one JSON file under ``--results`` (a missing file is named, not invented):

- the machine: CPU model, logical CPUs, flags, what the flags mean for the int8 / bf16 kernels, the
  measured limits (``machine_peak.py`` via ``compare_peers.py``);
- real trained networks (``real_models.json``, ``bench_real.py``);
- the accuracy-aware int8 fallback on untrained r50 / r100 (``fallback.json``, ``bench_fallback.py``);
- arcdeploy against PyTorch eager and ONNX Runtime's default session on generated r50 / r100
  (``peers.json``, ``compare_peers.py``);
- detection end to end (``e2e_detect.json``, ``bench_e2e_detect.py``);
- Ray scaling (``ray.json``, ``bench_ray.py``);
- the HTTP service under load (``serve.json``, ``bench_serve.py``);
- galleries, 1:N search at 10^4 .. 10^6 vectors (``gallery.json``, ``bench_gallery.py``);
- the GPU check (``gpu_check.json``, ``gpu_check.py``), or that it has not run.

Every number in the file is read from those JSON files; each section names the command that wrote its file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FILES = {
    "real": "real_models.json",
    "fallback": "fallback.json",
    "faithful": "faithful.json",
    "peers": "peers.json",
    "e2e": "e2e_detect.json",
    "photos": "photos.json",
    "ray": "ray.json",
    "serve": "serve.json",
    "gallery": "gallery.json",
    "gpu": "gpu_check.json",
}


def _load(folder: Path) -> dict:
    out = {}
    for key, name in FILES.items():
        path = folder / name
        if path.exists():
            out[key] = json.loads(path.read_text())
    return out


def _la(values) -> str:
    return " / ".join(f"{x:.1f}" for x in values or []) or "-"


def _not_measured(key: str, script: str) -> list[str]:
    return [f"Not measured: no `{FILES[key]}` (run `python benchmarks/{script}`).", ""]


def _run_cpu(doc: dict) -> str:
    """The CPU a benchmark's run had, as its result file records it."""
    m = doc.get("machine") or {}
    flags = ", ".join(m.get("flags") or []) or "none"
    return f"CPU of this run: {m.get('cpu')}, {m.get('logical_cpus')} logical CPUs, flags {flags}"


def _provenance(doc: dict, script: str) -> list[str]:
    cmd = doc.get("command") or f"python benchmarks/{script}"
    return [f"Produced by `{cmd}` ({doc.get('date', 'date not recorded')}).", ""]


def machine_section(docs: dict) -> list[str]:
    from machine_peak import describe_cpu, describe_limits

    cpu = (docs.get("real") or {}).get("machine") or (docs.get("peers") or {}).get("cpu")
    lines = ["## The machine", ""]
    if not cpu:
        return lines + ["No result file records the machine.", ""]
    flags = cpu.get("all_flags") or cpu.get("flags") or []
    lines += [
        f"- CPU: {cpu['cpu']}, {cpu['logical_cpus']} logical CPUs"
        + (f", {cpu['mhz']} MHz reported" if cpu.get("mhz") else ""),
        f"- Flags that decide the int8 / bf16 / f16 kernels: {', '.join(cpu.get('flags') or []) or 'none'} "
        "(the full /proc/cpuinfo list is in the JSON files)",
        "- Shared with other jobs: every section gives its load average (1 / 5 / 15 min); speed is compared as "
        "ratios between runners interleaved in the same run, and single img/s figures are indicative only.",
        "",
        describe_cpu(flags),
        "",
    ]
    peers = docs.get("peers")
    if peers and peers.get("limits"):
        lines += [
            describe_limits(peers["limits"])
            + f" (`compare_peers.py`'s probes, {peers['date']}; the table is in its section below.)",
            "",
        ]
    return lines


def real_section(doc: dict | None) -> list[str]:
    lines = ["## Real trained networks: fidelity, LFW accuracy and speed", ""]
    if not doc:
        return lines + _not_measured("real", "bench_real.py")
    from bench_real import markdown

    return lines + _provenance(doc, "bench_real.py") + [markdown(doc, level=3), ""]


def faithful_section(doc: dict | None) -> list[str]:
    lines = ["## int8 on faces unlike its calibration set (by group; previous recipe vs now)", ""]
    if not doc:
        return lines + _not_measured("faithful", "bench_faithful.py")
    from bench_faithful import markdown

    note = (
        "The int8 recipe changed with these measurements (depthwise convolutions in float, the widest per-image "
        "activation ranges): int8 figures in sections written before this one's date were measured with the "
        "previous recipe."
    )
    return lines + _provenance(doc, "bench_faithful.py") + [note, "", markdown(doc), ""]


def fallback_section(doc: dict | None) -> list[str]:
    lines = ["## The accuracy-aware int8 fallback (untrained r50 / r100, real LFW faces)", ""]
    if not doc:
        return lines + _not_measured("fallback", "bench_fallback.py")
    from bench_fallback import markdown

    return (
        lines
        + _provenance(doc, "bench_fallback.py")
        + [
            "Generated (untrained) IResNet weights: their int8 error is spread over many layers, the hard case for "
            "the fallback (a trained MobileFaceNet needs none: its recipe already meets the floor, table above). "
            "OpenVINO packages from one export, calibrated on 300 real LFW faces of 50 people, checked on 100 "
            "faces of 50 others (cosine to the fp32 reference; floor: mean >= 0.99, min >= 0.97). Speed: batch "
            f"{doc['batch']}, {doc['rounds']} rounds of >= {doc['seconds']:g} s per package taken in turns, median "
            f"img/s; x fp32 is the median of per-round ratios. Load average {_la(doc.get('load_average_start'))} at "
            f"the start, {_la(doc.get('load_average_end'))} at the end.",
            "",
            markdown(doc),
            "",
        ]
    )


def peers_section(doc: dict | None) -> list[str]:
    lines = ["## arcdeploy vs. what users run instead (generated r50 / r100, CPU)", ""]
    if not doc:
        return lines + _not_measured("peers", "compare_peers.py")
    from compare_peers import peers_markdown

    body = peers_markdown(doc, level=3, machine=False)
    # the command and date lead the section already
    body = "\n".join(line for line in body.splitlines() if not line.startswith(("Date: ", "Command: ")))
    return lines + _provenance(doc, "compare_peers.py") + [body.strip(), ""]


def e2e_section(doc: dict | None) -> list[str]:
    lines = ["## Detection end to end (real photos, SCRFD-500M)", ""]
    if not doc:
        return lines + _not_measured("e2e", "bench_e2e_detect.py")
    lines += _provenance(doc, "bench_e2e_detect.py")
    lines += [
        f"{doc['images']} images (the real photos, listed several times), {doc['detector']}, batch {doc['batch']}, "
        f"median of {doc['rounds']} interleaved rounds; ratios taken within each round, then the median. "
        "Recognition alone: `Package.infer` on the prepared crops; preparation alone: decode + detect + align in "
        "the pipeline's workers; end to end: `embed_files(..., detector=...)`. Serial bound: 1 / (1/prep + 1/recog), "
        "the rate if the two stages took turns on the CPU. Load average "
        f"{_la(doc.get('load_average_start'))} at the start, {_la(doc.get('load_average_end'))} at the end.",
        "",
        "| package | SCRFD engine | threads per detect | workers | recognition img/s | preparation img/s "
        "| end to end img/s | e2e / recognition | e2e / preparation | e2e / serial bound |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['package']} | {r['detector_engine']} | {r['detector_threads']} | {r['workers']} "
            f"| {r['recognition_alone_ips']:.1f} | {r['preparation_ips']:.1f} | {r['end_to_end_ips']:.1f} "
            f"| {r['ratio_e2e_to_recognition']:.2f} | {r['ratio_e2e_to_preparation']:.2f} "
            f"| {r['ratio_e2e_to_serial_bound']:.2f} |"
        )
    return lines + [""]


def ray_section(doc: dict | None) -> list[str]:
    lines = ["## Ray scaling (loopback clusters on this machine)", ""]
    if not doc:
        return lines + _not_measured("ray", "bench_ray.py")
    m = doc.get("manifest") or {}
    runs = doc["runs"]
    base = runs[0]["steady_images_per_s"] if runs else None
    lines += _provenance(doc, "bench_ray.py")
    lines += [
        f"{m.get('arch')} {m.get('engine')} {m.get('precision')} package, {doc['images']} real LFW images with "
        f"their landmarks{', each embedded twice (flip)' if doc.get('flip') else ''}, batch {doc['batch']}; a Ray "
        "cluster of that many nodes started on this machine (127.0.0.1, one CPU and one single-threaded actor "
        'per node, images read on the driver). "Once running" counts from the first finished block on. A local '
        f"run with one engine thread: {doc['local_1_thread_images_per_s']} images/s. Load average "
        f"{_la(doc.get('load_average_start'))} at the start, {_la(doc.get('load_average_end'))} at the end; the "
        "nodes share this machine's cores with the driver, Ray's own processes and other jobs.",
        "",
        "| nodes | wall s | first block s | images/s once running | speed-up | one actor, images/s "
        "| identical to the local run |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['nodes']} | {r['wall_s']} | {r['first_block_s']} | {r['steady_images_per_s']} "
            f"| {r['steady_images_per_s'] / base:.2f}x | {r['per_actor_images_per_s']} "
            f"| {'yes' if r['identical_to_local'] else 'NO'} |"
        )
    proj = doc.get("ijbc_hours_by_actors") or {}
    if proj:
        per_actor = min(r["per_actor_images_per_s"] for r in runs)
        lines += [
            "",
            f"Projected IJB-C time (469,375 images{', flip' if doc.get('flip') else ''}) at {per_actor} images/s per "
            "single-threaded actor (the slowest measured), assuming the actors of a larger cluster keep that speed: "
            + ", ".join(f"{a} actor{'s' if int(a) > 1 else ''} {h} h" for a, h in proj.items())
            + ".",
        ]
    return lines + [""]


def _ceiling(entry: dict) -> str:
    """The engine's own gain from batching (bench_serve's engine-alone runs): img/s and CPU per image."""
    c = entry.get("engine_alone")
    if not c:
        return "not measured"
    return f"{c['gain_images_per_s']:.2f}x img/s, {c['gain_cpu_per_image']:.2f}x CPU/img (batch {c['max_batch']})"


def photos_section(doc: dict | None) -> list[str]:
    lines = ["## Photos at engine speed (photo -> embedding, against insightface's own loop)", ""]
    if not doc:
        return lines + _not_measured("photos", "bench_photos.py")
    lines += _provenance(doc, "bench_photos.py")
    lines += [
        f"{_run_cpu(doc)}; load average {_la(doc.get('load_average_start'))} at the start,"
        f" {_la(doc.get('load_average_end'))} at the end. Median of {doc.get('rounds')} interleaved rounds, the "
        "contestants' order turned each round; ratios taken within each round. arcdeploy's preparation "
        f"workers: {doc.get('workers')}; the process keeps "
        "freed memory for reuse as the `arcdeploy` command does (`keep_freed_memory`; insightface's loop runs in "
        "the same process). Targets: 3x insightface's loop on the 12 MP set, 0.5x recognition alone "
        "on LFW-size photos, cosine >= 0.98 to insightface's embedding on every face it finds.",
        "",
        "| set | path | photos/s | faces/s | x insightface | x recognition alone |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        alone = r["contestant"] == "recognition alone"  # aligned crops: faces only
        photos = "-" if alone else f"{r['photos_per_s']:.1f}"
        to_alone = "-" if alone else f"{r['x_recognition_alone']:.2f}"
        lines.append(
            f"| {r['set']} | {r['contestant']} | {photos} | {r['faces_per_s']:.1f} | {r['x_insightface']:.2f} "
            f"| {to_alone} |"
        )
    lines += ["", "| set | path | decode ms | detect ms | align ms | recognise ms |", "|---|---|---:|---:|---:|---:|"]
    for b in doc.get("breakdown_ms_per_photo") or []:
        lines.append(
            f"| {b['set']} | {b['path']} | {b['decode']:.1f} | {b['detect']:.1f} | {b['align']:.1f} "
            f"| {b['recognise']:.1f} |"
        )
    lines += ["", "| set | detector + recognition | faces found / insightface's | cosine min | mean |"]
    lines += ["|---|---|---|---:|---:|"]
    for name, by in (doc.get("accuracy_vs_insightface") or {}).items():
        for how, a in by.items():
            lines.append(
                f"| {name} | {how} | {a['arcdeploy_faces']} / {a['insightface_faces']} | {a['cosine_min']:.4f} "
                f"| {a['cosine_mean']:.4f} |"
            )
    return lines + [""]


def serve_section(doc: dict | None) -> list[str]:
    lines = ["## Serving under load (arcdeploy serve, 127.0.0.1)", ""]
    if not doc:
        return lines + _not_measured("serve", "bench_serve.py")
    from bench_serve import table

    lines += _provenance(doc, "bench_serve.py")
    first = doc["results"][0] if doc["results"] else {}
    lines += [
        f"{_run_cpu(doc)}.",
        "",
        "One image per request (`crop`: a 112x112 aligned JPEG, `aligned=true`; `photo`: a real photo through "
        "SCRFD-500M), closed-loop clients on keep-alive connections, "
        f"{doc['duration_s']:g} s measured per run after 1 s of warm-up; the batching server "
        f"(--max-batch {first.get('max_batch')}, --max-wait-ms {first.get('max_wait_ms')}, "
        f"{first.get('workers')} preparation workers, engine threads {doc.get('engine_threads') or 'default'}, "
        f"engine streams {doc.get('engine_streams', 1)}) and the same server with --max-batch 1 loaded in turn; "
        "offline: `embed_files` (what `arcdeploy embed` runs) on the same files before and after. CPU ms/req: "
        "CPU time of all the server's threads per answered request, which depends far less than req/s on how much "
        f"of the shared machine a run got. Run at nice {doc.get('nice', 0)}; load average "
        f"{_la(doc.get('load_average_start'))} at the start, {_la(doc.get('load_average_end'))} at the end.",
        "",
        table(doc),
        "",
        "The last table: per request of the batching server at 32 clients, ms of CPU in the event-loop thread "
        "(HTTP parsing, multipart, JSON, batching), the preparation workers (decode, detection, alignment) and "
        "the engine's threads, the engine's wall time per face, and the load generator's own CPU.",
        "",
        "The serving targets, as measured here (32 clients: batched req/s at least 0.8x offline and 2x "
        "--max-batch 1; 8 clients: p99 within 3x p50):",
        "",
        "| package | workload | 32: x offline | 32: x max-batch 1 | 32: CPU/req, max-batch 1 / batched "
        "| engine alone, max batch / batch 1 (batching's gain inside the engine) | 8: p99 / p50 "
        "| cores got at 32, batched / max-batch 1 |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for e in doc["results"]:
        by = {r["clients"]: r for r in e["batched"]}
        one = {r["clients"]: r for r in e["max_batch_1"]}
        if 32 not in by or 8 not in by:
            continue
        b32, o32, b8 = by[32], one[32], by[8]
        to_off, to_one = b32["throughput"] / e["offline_images_per_s"], b32["throughput"] / o32["throughput"]
        tail = b8["p99_ms"] / b8["p50_ms"]
        mark = lambda ok: "" if ok else " (missed)"  # noqa: E731
        lines.append(
            f"| {e['package']} | {e['workload']} | {to_off:.3f}{mark(to_off >= 0.8)} | {to_one:.2f}{mark(to_one >= 2)} "
            f"| {o32['server_cpu_ms_per_request'] / b32['server_cpu_ms_per_request']:.2f} "
            f"| {_ceiling(e)} | {tail:.2f}{mark(tail <= 3)} "
            f"| {b32.get('server_on_cpu_cores', 0):.2f} / {o32.get('server_on_cpu_cores', 0):.2f} |"
        )
    lines += [
        "",
        "Cores got: CPU time the server's threads ran per second of the run (/proc schedstat), while their "
        "runnable threads waited for a CPU (the JSON's server_waiting_for_cpu) as other jobs held the cores. "
        "Where the two servers got different shares of the shared machine, req/s compares that share as much "
        "as the servers (a server that runs in short bursts and sleeps between them, batch 1, can be given more "
        "of a busy CPU than one that computes a batch at a stretch); CPU per request does not depend on the "
        "share, and is the figure to judge the batching by here.",
        "",
    ]
    return lines


def gallery_section(doc: dict | None) -> list[str]:
    lines = ["## Galleries: 1:N search", ""]
    if not doc:
        return lines + _not_measured("gallery", "bench_gallery.py")
    lines += _provenance(doc, "bench_gallery.py")
    v = doc.get("versions") or {}
    lines += [
        f"Real embeddings of the shared LFW faces ({doc['model'].get('arch')}, fp32) plus random unit vectors up "
        "to each size; the queries are held-out real photos (one per person). Search: top "
        f"{doc['top_k']} identities, an identity's score the best of its samples. Single queries and batches of "
        "100, the stores timed in turns. Memory: resident-set growth when the gallery is opened and searched "
        "(PostgreSQL: table and index size on the server). Recall: of the exact top-1 / top-10 identities; "
        f"rank-1: the probe's own identity first. FAISS {v.get('faiss', '?')}, PostgreSQL "
        f"{v.get('postgresql', '?')}, pgvector {v.get('pgvector', '?')}. Load average "
        f"{_la(doc.get('load_average_start'))} at the start, {_la(doc.get('load_average_end'))} at the end.",
        "",
        "| vectors | store | add vectors/s | memory MiB | x raw fp32 | single p50 / p99 ms | batch-100 p50 ms "
        "| x numpy | recall@1 | recall@10 | rank-1 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in doc["sizes"]:
        for label, r in size["stores"].items():
            add = f"{r['add_vectors_per_s']:.0f}" if "add_vectors_per_s" in r else "-"
            mib = r["memory_bytes"] / 2**20
            lines.append(
                f"| {size['vectors']:,} | {label} | {add} | {mib:.0f} | {r['memory_vs_raw_fp32']} "
                f"| {r['single']['p50_ms']:.1f} / {r['single']['p99_ms']:.1f} | {r['batch100']['p50_ms']:.0f} "
                f"| {r['batch100_vs_numpy']:.2f} | {r['recall@1']:.4f} | {r['recall@10']:.4f} "
                f"| {r['rank1_accuracy']:.3f} |"
            )
    notes = []
    everywhere = set().union(*(size["stores"] for size in doc["sizes"]))
    for size in doc["sizes"]:
        missing = sorted(everywhere - set(size["stores"]))
        if missing:
            notes.append(f"not run at {size['vectors']:,}: {', '.join(missing)} (index build time on this machine)")
        fewer = [
            f"{k} {r['probes_scored']}" for k, r in size["stores"].items() if r.get("probes_scored", 0) < size["probes"]
        ]
        if fewer:
            notes.append(
                f"recall and rank-1 at {size['vectors']:,} on fewer of the {size['probes']} probes: {', '.join(fewer)}"
            )
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    proj = doc.get("projection_1e7")
    if proj:
        parts = []
        for label, p in proj["stores"].items():
            t = f", batch-100 {p['batch100_p50_ms'] / 1000:.1f} s" if "batch100_p50_ms" in p else ""
            parts.append(f"{label} {p['memory_GiB']} GiB{t}")
        lines += [
            "",
            f"Projected to 10^7 vectors from {proj['from_vectors']:,} (memory by bytes per vector, exact search "
            f"time linearly; raw fp32 {proj['raw_fp32_GiB']} GiB): " + "; ".join(parts) + ".",
        ]
    return lines + [""]


def gpu_section(doc: dict | None) -> list[str]:
    lines = ["## GPU", ""]
    if not doc:
        return lines + [
            "`benchmarks/gpu_check.py` (torch fp16 / bf16 packages of r50 / r100 at batch 1 / 64 / 256 on a CUDA "
            "GPU, against the GPU's measured bf16 matmul rate) has not run: no GPU was lent to this work, so "
            "there are no GPU figures here.",
            "",
        ]
    lines += _provenance(doc, "gpu_check.py")
    return lines + ["```json", json.dumps(doc, indent=1)[:6000], "```", ""]


def compose(folder: Path) -> str:
    docs = _load(folder)
    lines = [
        "# arcdeploy benchmark results",
        "",
        f"Composed by `python benchmarks/write_results.py` on "
        f"{dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')} from the JSON files in `benchmarks/results/`; "
        "every figure below is read from one of them, and each section names the command that wrote its file. "
        "Measured on a shared 2-core machine: compare runners by the ratios taken within one run.",
        "",
    ]
    lines += machine_section(docs)
    lines += real_section(docs.get("real"))
    lines += faithful_section(docs.get("faithful"))
    lines += fallback_section(docs.get("fallback"))
    lines += peers_section(docs.get("peers"))
    lines += e2e_section(docs.get("e2e"))
    lines += photos_section(docs.get("photos"))
    lines += ray_section(docs.get("ray"))
    lines += serve_section(docs.get("serve"))
    lines += gallery_section(docs.get("gallery"))
    lines += gpu_section(docs.get("gpu"))
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=HERE / "results", help="folder of the JSON results")
    ap.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = ap.parse_args(argv)
    text = compose(args.results)
    from arcdeploy.files import write_text_atomic

    write_text_atomic(args.out, text)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
