"""arcdeploy check PKG [--images LIST|DIR] [--landmarks FILE | --detector FILE] [--json FILE]"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "check",
        help="per-image cosine of a package against its fp32 reference",
        description="Run the package and its stored fp32 reference on the same aligned faces "
        "and report per-image cosine (mean, min, 1st percentile) against the precision's floor, overall and "
        "by group: colour / grayscale, face size, and the subfolders of --images DIR (label your faces by "
        "putting each group in its own folder). The worst group is the verdict; the lowest faces are named. "
        "Exit status 1 when any group is below the floor.",
    )
    p.add_argument("package", metavar="PKG", help="a built package folder")
    p.add_argument("--images", metavar="LIST|DIR", help="images to check on (default: 64 generated faces)")
    p.add_argument("--landmarks", metavar="FILE", help="5-point landmark file: align the images with it")
    p.add_argument("--detector", metavar="FILE", help="SCRFD or YuNet detector: find the largest face in each photo")
    p.add_argument("--count", type=int, metavar="N", help="use at most N images (generated: how many)")
    p.add_argument("--threads", type=int, metavar="N", help="inference threads")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON")
    p.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import check
    from ..fidelity_groups import table
    from ..files import refuse_existing, write_json_atomic

    if args.json:
        refuse_existing(args.json, args.force)
    result = check(
        args.package,
        images=args.images,
        landmarks=args.landmarks,
        detector=args.detector,
        count=args.count,
        threads=args.threads,
    )
    if args.json:
        write_json_atomic(args.json, result.to_json(), force=args.force)
    c = result.cosine
    print(
        f"{args.package}: {result.engine} {result.precision} vs {result.reference} on {c.n} "
        f"{result.images} images: cosine mean {c.mean:.6f} min {c.min:.6f} p1 {c.p1:.6f} max {c.max:.6f}"
    )
    if result.groups is not None:
        print(table(result.groups, result.floor).text())
    floor = ", ".join(f"{k} >= {v}" for k, v in result.floor.items())
    if result.passed:
        print(f"  passed on every group (floor {floor})")
        return 0
    print(f"arcdeploy check: below the floor ({floor}): {'; '.join(result.below_floor)}", file=sys.stderr)
    return 1
