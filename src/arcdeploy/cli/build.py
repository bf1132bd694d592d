"""arcdeploy build SRC --engine ... --precision ... [--calib LIST|DIR] -o PKG"""

from __future__ import annotations

from ..engines.registry import DEFAULT_ENGINE, engine_names
from ..manifest import PRECISION_ALIASES, PRECISIONS
from ..quantize import MIN_CALIBRATION_FACES
from .export import add_convention_options, convention_options


def register(sub) -> None:
    p = sub.add_parser(
        "build",
        help="checkpoint, export or ONNX -> a verified package (engine x precision)",
        description="Compile a checkpoint (export implied), an export folder, or an ONNX file into PKG for one "
        "engine and precision, then check it per image against its fp32 reference.",
    )
    p.add_argument(
        "src",
        metavar="SRC",
        help="backbone.pth, an export folder, an exported model.onnx, or a "
        "foreign recognition MODEL.onnx (its input convention is detected)",
    )
    p.add_argument(
        "--engine", default=DEFAULT_ENGINE, choices=engine_names(), help=f"inference engine (default {DEFAULT_ENGINE})"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=(*PRECISIONS, "auto", *PRECISION_ALIASES),
        metavar="PRECISION",
        help="fp32, fp16, bf16 or int8 (aliases force_float32, force_float16, qint8_mixed_float16), or auto: "
        "build the precisions this CPU runs fast, check each on the check images by group, keep the fastest "
        "that meets its floor on every group (the manifest says why)",
    )
    p.add_argument(
        "--calib",
        metavar="LIST|DIR",
        help="calibration images for int8 (aligned crops, or photos with --calib-landmarks)",
    )
    p.add_argument(
        "--calib-landmarks", metavar="FILE", help="5-point (or 68-point) landmark file for the calibration images"
    )
    p.add_argument("--calib-detector", metavar="FILE", help="SCRFD or YuNet detector finding each calibration face")
    p.add_argument(
        "--calib-count",
        type=int,
        default=None,
        metavar="N",
        help="calibration images to use (default 300; the rest check fidelity)",
    )
    p.add_argument(
        "--int8-float",
        choices=("f32", "bf16", "auto"),
        default=None,
        help="what the layers an int8 model keeps in float execute in (OpenVINO; default f32: "
        "on bf16-capable CPUs the plugin would otherwise run them in bf16)",
    )
    p.add_argument(
        "--check-images",
        metavar="LIST|DIR",
        help="images for the fidelity check (default: held-out calibration images, else generated faces)",
    )
    p.add_argument("--check-landmarks", metavar="FILE", help="5-point landmark file for --check-images")
    p.add_argument("--check-count", type=int, metavar="N", help="at most N images for the fidelity check (default 64)")
    p.add_argument("--batch", type=int, metavar="N", help="batch size to compile for (OpenVINO: a static shape)")
    p.add_argument("--threads", type=int, metavar="N", help="inference threads recorded as the package default")
    p.add_argument("--arch", default="auto", help="architecture when SRC is a checkpoint (default: read off the keys)")
    add_convention_options(p)
    p.add_argument(
        "--fold-preprocessing",
        action="store_true",
        help="the graph takes uint8 NHWC RGB and normalises inside (openvino, onnxruntime)",
    )
    p.add_argument(
        "--strict", action="store_true", help="fail, writing nothing, when fidelity is below the precision's floor"
    )
    p.add_argument(
        "--max-cosine-drop",
        type=float,
        default=None,
        metavar="D",
        help="int8: the mean per-image cosine to fp32 may fall at most D below 1 (default: the int8 floor, 0.01)",
    )
    p.add_argument(
        "--accept-calib",
        action="store_true",
        help=f"int8: build even on a calibration set the recipe refuses (under {MIN_CALIBRATION_FACES} faces)",
    )
    p.add_argument(
        "--no-fallback",
        action="store_true",
        help="int8: do not keep sensitive layers in float when the package misses its floor",
    )
    p.add_argument("--force", action="store_true", help="replace PKG if it exists")
    p.add_argument("-o", "--output", required=True, metavar="PKG", help="package folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import build
    from ..manifest import read_package_manifest
    from ..quantize import QuantRecipe

    recipe = None
    if args.int8_float or args.calib_count:
        recipe = QuantRecipe.for_this_cpu(float_precision=args.int8_float, calibration_count=args.calib_count)
    out = build(
        args.src,
        args.output,
        engine=args.engine,
        precision=args.precision,
        calib=args.calib,
        calib_landmarks=args.calib_landmarks,
        calib_detector=args.calib_detector,
        calib_count=args.calib_count,
        batch=args.batch,
        threads=args.threads,
        arch=args.arch,
        force=args.force,
        strict=args.strict,
        max_cosine_drop=args.max_cosine_drop,
        fallback=not args.no_fallback,
        fold_preprocessing=args.fold_preprocessing,
        check_images=args.check_images,
        check_landmarks=args.check_landmarks,
        check_count=args.check_count,
        recipe=recipe,
        onnx_options=convention_options(args),
        **({"accept_calib": True} if args.accept_calib else {}),
    )
    m = read_package_manifest(out)
    fid = m.fidelity or {}
    c = fid.get("cosine", {})
    print(f"built {m.arch} {m.engine} {m.precision} -> {out}")
    ex = m.executed or {}
    if ex.get("layers"):
        print(f"  executes: {ex['inference_precision']} ({', '.join(f'{k} {v}' for k, v in ex['layers'].items())})")
    if m.calibration:
        cal = m.calibration
        roles = ", ".join(cal.get("kept_float_why", {})) or "none"
        print(
            f"  calibration: {cal['count']} images from {cal['source']}; kept in float: "
            f"{len(cal.get('kept_float', []))} ops ({roles})"
        )
    state = "passed" if fid.get("passed") else "BELOW FLOOR (" + "; ".join(fid.get("below_floor", [])) + ")"
    print(
        f"  fidelity vs {fid.get('reference')} on {c.get('n')} {fid.get('images')} images: "
        f"cosine mean {c.get('mean', 0):.6f} "
        f"min {c.get('min', 0):.6f} p1 {c.get('p1', 0):.6f} -> {state}"
    )
    if m.fidelity_groups is not None:
        from ..fidelity_groups import table

        print("  " + table(m.fidelity_groups, fid.get("floor", {})).text().replace("\n", "\n  "))
    if m.precision_choice is not None:
        print(f"  precision auto: {m.precision_choice.why}")
    return 0
