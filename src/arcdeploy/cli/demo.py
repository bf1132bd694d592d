"""arcdeploy demo [-o OUT]: the whole pipeline on generated data, no downloads."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on built-in generated data (no downloads)",
        description="Generate an untrained r18 checkpoint, an IJB-C-format mini set and a .bin set, "
        "then export, build fp32/bf16/int8, check, bench, evaluate and write a report.",
    )
    p.add_argument(
        "-o", "--output", default="arcdeploy-demo", metavar="OUT", help="output folder (default ./arcdeploy-demo)"
    )
    p.add_argument("--quick", action="store_true", help="a smaller configuration (for tests and slow machines)")
    p.add_argument(
        "--force", action="store_true", help="write into OUT even though it holds files arcdeploy did not write"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from ..demo import QUICK, UNTRAINED_NOTE, DemoConfig, demo
    from .run import finish, progress

    result = demo(args.output, QUICK if args.quick else DemoConfig(), log=progress, force=args.force)
    return finish("demo", result, note=UNTRAINED_NOTE)
