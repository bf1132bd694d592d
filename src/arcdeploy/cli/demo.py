"""arcdeploy demo [-o OUT]: the whole pipeline on generated data, no downloads."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on built-in generated data (no downloads)",
                       description="Generate an untrained r18 checkpoint, an IJB-C-format mini set and a .bin set, "
                                   "then export, build fp32/bf16/int8, check, bench, evaluate and write a report.")
    p.add_argument("-o", "--output", default="arcdeploy-demo", metavar="OUT", help="output folder (default ./arcdeploy-demo)")
    p.add_argument("--quick", action="store_true", help="a smaller configuration (for tests and slow machines)")
    p.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..demo import QUICK, UNTRAINED_NOTE, DemoConfig, demo
    from ..report import print_tables

    result = demo(args.output, QUICK if args.quick else DemoConfig())
    print()
    print_tables(result.steps)
    print(f"NOTE: {UNTRAINED_NOTE}")
    print()
    print(f"report: {result.report_md}")
    print(f"        {result.report_json}")
    if result.failed:
        names = ", ".join(s.name for s in result.failed)
        print(f"arcdeploy demo: error: {len(result.failed)} step(s) failed: {names} (see {result.report_md})", file=sys.stderr)
        return 3
    return 0
