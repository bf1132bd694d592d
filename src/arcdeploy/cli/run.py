"""arcdeploy run CKPT ... -o OUT: export -> build each precision -> check -> bench -> eval -> report."""
from __future__ import annotations


def _int_list(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole job for one checkpoint, with a report",
                       description="Export, build each precision, check fidelity, bench, evaluate where data is "
                                   "given, and write OUT/report.md and OUT/report.json. A failing step is reported "
                                   "and the rest still run; rerunning reuses finished steps.")
    p.add_argument("ckpt", metavar="CKPT", help="the backbone.pth state dict")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (reused on rerun)")
    p.add_argument("--arch", default="auto")
    p.add_argument("--engine", default="openvino", choices=("openvino", "onnxruntime", "torch"))
    p.add_argument("--precisions", default="fp32,bf16,int8", help="comma-separated (default fp32,bf16,int8)")
    p.add_argument("--calib", metavar="LIST|DIR", help="calibration images for int8 (aligned crops, or loose with --calib-landmarks)")
    p.add_argument("--calib-landmarks", metavar="FILE")
    p.add_argument("--check-images", metavar="LIST|DIR", help="held-out images for the fidelity check (default: generated)")
    p.add_argument("--check-landmarks", metavar="FILE")
    p.add_argument("--ijb", metavar="ROOT", help="IJB root (folder with meta/ and loose_crop/)")
    p.add_argument("--target", default="IJBC", choices=("IJBC", "IJBB"))
    p.add_argument("--no-flip", action="store_true", help="IJB without the flip test")
    p.add_argument("--bins", nargs="+", default=[], metavar="FILE.bin", help=".bin verification sets")
    p.add_argument("--batches", type=_int_list, default=[1, 16], help="bench batch sizes (default 1,16)")
    p.add_argument("--iterations", type=int, default=None, help="bench iterations per batch size")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..build import normalize_precision
    from ..report import print_tables
    from ..run import run_pipeline

    precisions = [normalize_precision(p.strip()) for p in args.precisions.split(",") if p.strip()]
    result = run_pipeline(
        args.ckpt, args.output, engine=args.engine, precisions=precisions, calib=args.calib,
        calib_landmarks=args.calib_landmarks, check_images=args.check_images,
        check_landmarks=args.check_landmarks, ijb_root=args.ijb, target=args.target, bins=args.bins,
        batches=args.batches, iterations=args.iterations, threads=args.threads, arch=args.arch,
        ijb_flip=not args.no_flip,
    )
    print_tables(result.steps)
    print(f"report: {result.report_md}")
    if result.failed:
        import sys

        names = ", ".join(s.name for s in result.failed)
        print(f"arcdeploy run: error: {len(result.failed)} step(s) failed: {names} (see {result.report_md})", file=sys.stderr)
        return 3
    return 0
