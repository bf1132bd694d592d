"""arcdeploy eval ijb ... | arcdeploy eval bin PKG [PKG ...] FILE.bin [FILE.bin ...]"""

from __future__ import annotations

import sys

from .ray_args import add_ray_arguments, ray_options


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy: IJB-B/IJB-C 1:1 TAR@FAR and 1:N TPIR@FPIR, LFW-style .bin sets",
        description="Accuracy as insightface computes it: IJB-B/IJB-C 1:1 verification "
        "(eval_ijbc.py), IJB-B/IJB-C 1:N identification (ijb_evals.py) and LFW-style .bin sets "
        "(verification.py).",
    )
    esub = p.add_subparsers(dest="eval_command", metavar="SET")
    esub.required = True

    ij = esub.add_parser(
        "ijb",
        help="IJB-B / IJB-C 1:1 verification (TAR at FAR 1e-6 ... 1e-1) or 1:N identification (TPIR at FPIR)",
        description="IJB-B/IJB-C 1:1 verification or 1:N open-set identification from packages "
        "(features extracted, cached in OUTDIR and resumed; a cache is reused only while its "
        "checksum holds, and serves both protocols) or from a features file. Several packages "
        "give one table and one plot; the JSON has the first at top level and all of them in "
        "'results'. Templates are aggregated in float32 as insightface does, so the numbers "
        "equal its own on the same features. 1:N searches each gallery (IJB-C G1, G2; IJB-B S1, "
        "S2) with every probe template, as insightface's ijb_evals.py does: TPIR at FPIR "
        "1e-4 ... 1 per gallery and their mean, rank-1/5/10. Existing result files in OUTDIR "
        "and the --json file are only replaced with --force.",
    )
    ij.add_argument("packages", nargs="*", metavar="PKG", help="built package(s)")
    ij.add_argument("--root", required=True, metavar="DIR", help="IJB_release/IJBC (or IJBB): meta/ and loose_crop/")
    ij.add_argument("--target", default="IJBC", type=str.upper, choices=("IJBC", "IJBB"))
    ij.add_argument(
        "--protocol",
        default="1:1",
        type=str.upper,
        choices=("1:1", "1:N"),
        help="1:1 verification (default; the pair file) or 1:N identification (meta/<t>_1N_gallery_G1.csv, "
        "_G2.csv and _probe_mixed.csv; IJB-B: _S1, _S2)",
    )
    ij.add_argument(
        "--features",
        action="append",
        default=[],
        metavar="FEATS.npy",
        help="float [N, D] (no flip: mode F0) or [N, 2, D] (image, flipped image; raw features) "
        "in 5pts-file row order; repeatable",
    )
    ij.add_argument("--no-flip", action="store_true", help="no flip test (mode F0)")
    ij.add_argument("--no-detector-score", action="store_true", help="do not weight by faceness score (D0)")
    ij.add_argument("--normalize-images", action="store_true", help="L2-normalise each image feature (N0)")
    ij.add_argument(
        "--float64",
        action="store_true",
        help="aggregate templates in float64 instead of insightface's float32 (more exact, but a few "
        "near-tied scores rank differently from insightface's, which can move a TAR's last digit)",
    )
    ij.add_argument("--batch", type=int, default=None, metavar="N", help="inference batch size")
    ij.add_argument("--json", metavar="FILE", help="also write the result JSON here")
    ij.add_argument(
        "-o",
        "--output",
        metavar="OUTDIR",
        help="write here the features cache; 1:1: scores, roc.png, result.json; 1:N: tpir_fpir.png, cmc.png, "
        "result_1n.json. Without it the results are only printed (and written to --json), and the "
        "features of packages are cached in ./ijb_<target>_features so a rerun resumes",
    )
    ij.add_argument("--force", action="store_true", help="replace existing result files and --json FILE")
    ij.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(ij)
    ij.set_defaults(func=run_ijb)

    b = esub.add_parser(
        "bin",
        help="LFW-style .bin sets: 10-fold accuracy with flip",
        description="Verification accuracy on .bin sets (lfw, cfp_fp, agedb_30, ...): "
        "packages first, then .bin files. A set must hold exactly two square "
        "images per pair label.",
    )
    b.add_argument("items", nargs="+", metavar="PKG|FILE.bin", help="package folder(s), then .bin file(s)")
    b.add_argument("--batch", type=int, default=64, metavar="N", help="inference batch size (default 64)")
    b.add_argument("--json", metavar="FILE", help="write the results as JSON")
    b.add_argument("--force", action="store_true", help="replace an existing --json FILE")
    b.set_defaults(func=run_bin)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_ijb(args) -> int:
    from pathlib import Path

    from ..errors import ArcdeployError
    from ..evaluate.ijb import evaluate_ijb
    from ..faces.io import display_name

    if args.packages and args.features:
        raise ArcdeployError("give packages or --features, not both")
    if args.batch is not None and args.batch < 1:
        raise ArcdeployError(f"--batch must be at least 1, got {args.batch}")
    ray = ray_options(args)
    if ray is not None and not args.packages:
        raise ArcdeployError("--ray extracts features from packages; with --features there is nothing to extract")
    doc = evaluate_ijb(
        args.root,
        args.target,
        packages=args.packages,
        features=args.features,
        flip=not args.no_flip,
        detector_score=not args.no_detector_score,
        normalize_images=args.normalize_images,
        batch=args.batch,
        out_dir=args.output,
        json_path=args.json,
        progress=not args.no_progress,
        log=_log,
        force=args.force,
        precision="float64" if args.float64 else "float32",
        ray=ray,
        protocol=args.protocol,
    )
    if args.protocol == "1:N":
        return _print_1n(doc)
    print(doc["table"])
    for r in doc["results"]:
        print(
            f"{r['name']}: mode {r['mode']}, {r['pairs']} pairs ({r['genuine']} genuine), "
            f"{r['templates']} templates, {r['images']} images, AUC {100 * r['auc']:.4f} %"
            + (f", {r['failed_images']} failed images" if r["failed_images"] else "")
            + (f", {r['empty_templates']} templates without a usable feature" if r["empty_templates"] else "")
        )
    if args.output:
        print(f"scores, roc.png and result.json in {display_name(Path(args.output))}")
    return 0


def _print_1n(doc: dict) -> int:
    from pathlib import Path

    from ..faces.io import display_name

    print("TPIR (%) at FPIR")
    print(doc["table"])
    print("rank-k (%): mates within the top k in either gallery / all probes")
    print(doc["rank_table"])
    for r in doc["results"]:
        g = r["galleries"]
        print(
            f"{r['name']}: mode {r['mode']}, {r['probes']} probe templates; "
            + "; ".join(
                f"{v['name']}: {v['templates']} templates, {v['mated']} mated and {v['non_mated']} non-mated probes"
                for v in g.values()
            )
            + f"; {r['images']} images"
            + (f", {r['failed_images']} failed images" if r["failed_images"] else "")
            + (f", {r['empty_templates']} templates without a usable feature" if r["empty_templates"] else "")
        )
    where = Path(doc["plots"]["cmc"]).parent if doc.get("plots") else None
    if where is not None:
        print(f"tpir_fpir.png, cmc.png and result_1n.json in {display_name(where)}")
    return 0


def run_bin(args) -> int:
    from pathlib import Path

    from ..errors import ArcdeployError
    from ..evaluate.binsets import evaluate_bins, format_bin_table
    from ..files import refuse_existing, write_json_atomic
    from ..package import load

    packages: list[Path] = []
    bins: list[Path] = []
    for item in args.items:
        p = Path(item)
        if p.is_dir():
            if bins:
                raise ArcdeployError(f"{item}: packages must come before the .bin files")
            packages.append(p)
        else:
            bins.append(p)
    if not packages:
        raise ArcdeployError("eval bin: no package given (usage: arcdeploy eval bin PKG [PKG ...] FILE.bin [...])")
    if not bins:
        raise ArcdeployError("eval bin: no .bin file given")
    if args.batch < 1:
        raise ArcdeployError(f"--batch must be at least 1, got {args.batch}")
    for b in bins:
        if not b.exists():
            raise ArcdeployError(f"{b}: no such .bin file")
    if args.json:
        refuse_existing(args.json, args.force)  # before any work
    rows: list = []
    per_package: list[dict] = []
    for pkg_dir in packages:
        pkg = load(pkg_dir)
        results = evaluate_bins(pkg, bins, batch=args.batch, log=_log)
        per_package.append({"package": str(pkg.path), "results": [r.to_json() for r in results]})
        rows.extend(results)
    print(format_bin_table(rows))
    if args.json:
        doc: dict
        if len(packages) > 1:
            doc = {"results": [r.to_json() for r in rows], "packages": [str(p) for p in packages]}
        else:
            doc = per_package[0]
        write_json_atomic(args.json, doc, force=args.force)
    return 0
