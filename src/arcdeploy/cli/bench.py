"""arcdeploy bench PKG --batch 1,8,32 [--iterations N | --duration S] [--json FILE]"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput and latency (mean, p50..p99) per batch size",
        description="Benchmark a built package: load + compile time, then per batch size "
        "throughput (images/s) and latency mean/p50/p90/p95/p99 (ms), peak memory.",
    )
    p.add_argument("package", metavar="PKG", help="a package folder (arcdeploy build -o PKG)")
    p.add_argument(
        "--batch", default="1,8,32", metavar="B[,B...]", help="batch sizes, comma separated (default 1,8,32)"
    )
    p.add_argument("--iterations", type=str, default=None, metavar="N", help="timed runs per batch size")
    p.add_argument(
        "--duration",
        type=str,
        default=None,
        metavar="S",
        help="seconds per batch size (default: about 3 s, at least 3 runs; not with --iterations)",
    )
    p.add_argument(
        "--warmup", type=str, default="2", metavar="N", help="untimed runs before timing each batch size (default 2)"
    )
    p.add_argument("--threads", type=str, default=None, metavar="N", help="inference threads (default: the engine's)")
    p.add_argument(
        "--streams",
        type=str,
        default=None,
        metavar="N",
        help="requests in flight in throughput mode (default: the engine's optimal number)",
    )
    p.add_argument(
        "--mode",
        default="latency",
        choices=("latency", "throughput"),
        help="latency: one request at a time; throughput: several in flight where the engine allows",
    )
    p.add_argument(
        "--e2e",
        default=None,
        metavar="IMAGES",
        help="also time decode + align + infer on these image files (folder or list of paths)",
    )
    p.add_argument(
        "--landmarks",
        default=None,
        metavar="FILE",
        help="with --e2e: 5-point landmark file, so the images are aligned (without: taken as aligned crops)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the results as JSON")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    p.set_defaults(func=run)


def _int(name: str, value, minimum: int):
    from ..errors import ArcdeployError

    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise ArcdeployError(f"--{name} {value!r}: not an integer") from None
    if n < minimum:
        raise ArcdeployError(f"--{name} {value}: must be >= {minimum}")
    return n


def run(args) -> int:
    import sys

    from ..bench import bench, format_report, parse_batches
    from ..errors import ArcdeployError
    from ..files import refuse_existing, write_json_atomic

    batches = parse_batches(args.batch)
    if args.json:
        refuse_existing(args.json, args.force)
    if args.landmarks and not args.e2e:
        raise ArcdeployError("--landmarks is used with --e2e IMAGES only")
    if args.iterations is not None and args.duration is not None:
        raise ArcdeployError("give --iterations or --duration, not both")
    duration = None
    if args.duration is not None:
        try:
            duration = float(args.duration)
        except ValueError:
            raise ArcdeployError(f"--duration {args.duration!r}: not a number of seconds") from None
        if not duration > 0:
            raise ArcdeployError(f"--duration {args.duration}: must be > 0 seconds")
    res = bench(
        args.package,
        batches=batches,
        iterations=_int("iterations", args.iterations, 1),
        duration=duration,
        warmup=_int("warmup", args.warmup, 0),
        threads=_int("threads", args.threads, 1),
        streams=_int("streams", args.streams, 1),
        mode=args.mode,
        e2e=args.e2e,
        e2e_landmarks=args.landmarks,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(format_report(res))
    if args.json:
        write_json_atomic(args.json, res.to_json(), force=args.force)
        print(f"[ INFO ] JSON          {args.json}")
    return 0
