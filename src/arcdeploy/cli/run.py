"""arcdeploy run CKPT ... -o OUT: export -> build each precision -> check -> bench -> eval -> report."""

from __future__ import annotations

from ..engines.registry import DEFAULT_ENGINE, engine_names
from ..types import AUTO_PRECISION


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="the whole job for one checkpoint, with a report",
        description="Export, build each precision, check fidelity, bench, evaluate where data is "
        "given, and write OUT/report.md and OUT/report.json. A failing step is reported "
        "and the rest still run; rerunning reuses finished steps.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="the backbone.pth state dict")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (reused on rerun)")
    p.add_argument("--arch", default="auto")
    p.add_argument("--engine", default=DEFAULT_ENGINE, choices=engine_names())
    p.add_argument(
        "--precisions",
        default=AUTO_PRECISION,
        help="comma-separated; auto (the default): the precisions this CPU runs fast (fp32, bf16 where it has "
        "bf16 units, int8 with --calib); the run then says which one to deploy: the fastest that meets its "
        "floor on every group of the check images",
    )
    p.add_argument(
        "--calib",
        metavar="LIST|DIR",
        help="calibration images for int8 (aligned crops, or loose with --calib-landmarks)",
    )
    p.add_argument("--calib-landmarks", metavar="FILE")
    p.add_argument(
        "--check-images", metavar="LIST|DIR", help="held-out images for the fidelity check (default: generated)"
    )
    p.add_argument("--check-landmarks", metavar="FILE")
    p.add_argument("--ijb", metavar="ROOT", help="IJB root (folder with meta/ and loose_crop/)")
    p.add_argument("--target", default="IJBC", choices=("IJBC", "IJBB"))
    p.add_argument("--no-flip", action="store_true", help="IJB without the flip test")
    p.add_argument("--bins", nargs="+", default=[], metavar="FILE.bin", help=".bin verification sets")
    p.add_argument("--batches", default="1,16", help="bench batch sizes, comma separated (default 1,16)")
    p.add_argument("--iterations", type=int, default=None, help="bench iterations per batch size")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--force", action="store_true", help="write into OUT even though it holds files arcdeploy did not write"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..bench import parse_batches
    from ..options import BuildOptions, RunOptions
    from ..run import run_pipeline
    from ..types import parse_precision_request

    options = RunOptions(
        build=BuildOptions(
            engine=args.engine,
            arch=args.arch,
            calib=args.calib,
            calib_landmarks=args.calib_landmarks,
            threads=args.threads,
        ),
        precisions=tuple(parse_precision_request(p.strip()) for p in args.precisions.split(",") if p.strip()),
        check_images=args.check_images,
        check_landmarks=args.check_landmarks,
        ijb_root=args.ijb,
        target=args.target,
        bins=tuple(args.bins),
        batches=tuple(parse_batches(args.batches)),
        iterations=args.iterations,
        ijb_flip=not args.no_flip,
        force=args.force,
    )
    return finish("run", run_pipeline(args.ckpt, args.output, options, log=progress))


def progress(message: str) -> None:
    """Step progress of run and demo, on stderr as it happens."""
    import sys

    print(message, file=sys.stderr, flush=True)


def finish(command: str, result, note: str | None = None) -> int:
    """Print the tables and where the report is; exit 3 when a step failed (named on stderr)."""
    import sys

    from ..report import tables_text

    print()
    print(tables_text(result.steps))
    if note:
        print(f"NOTE: {note}")
        print()
    print(f"report: {result.report_md}")
    print(f"        {result.report_json}")
    if result.failed:
        names = ", ".join(s.name for s in result.failed)
        print(
            f"arcdeploy {command}: error: {len(result.failed)} step(s) failed: {names} (see {result.report_md})",
            file=sys.stderr,
        )
        return 3
    return 0
