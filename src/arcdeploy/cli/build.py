"""arcdeploy build SRC --engine ... --precision ... [--calib LIST|DIR] -o PKG"""

from __future__ import annotations

from ..engines.registry import DEFAULT_ENGINE, engine_names
from ..quantize import MIN_CALIBRATION_FACES
from ..types import AUTO_PRECISION, FloatLayerPrecision, Precision
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
        choices=(*Precision.choices(), AUTO_PRECISION),
        metavar="PRECISION",
        help="fp32, fp16, bf16 or int8 (aliases force_float32, force_float16, qint8_mixed_float16), or auto: "
        "build the precisions this CPU runs fast, check each on the check images by group, keep the fastest "
        "that meets its floor on every group (the manifest says why)",
    )
    _add_int8_arguments(p)
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
        "--input-size",
        metavar="WxH",
        help="a face detector (SCRFD ONNX) as SRC: its fixed input, width x height (default 640x640)",
    )
    p.add_argument("--force", action="store_true", help="replace PKG if it exists")
    p.add_argument("-o", "--output", required=True, metavar="PKG", help="package folder to write")
    p.set_defaults(func=run)


def _add_int8_arguments(p) -> None:
    """What an int8 build is calibrated on, and how faithful it must stay."""
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
        choices=tuple(FloatLayerPrecision),
        default=None,
        help="what the layers an int8 model keeps in float execute in (OpenVINO; default f32: "
        "on bf16-capable CPUs the plugin would otherwise run them in bf16)",
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


def _detector_options(args) -> dict:
    """--input-size for a detector source (a one-line error for a recognition model)."""
    from ..detector_package import is_detector_source
    from ..errors import ArcdeployError

    if args.input_size is None:
        return {}
    if not is_detector_source(args.src):
        raise ArcdeployError("--input-size applies to a face detector (an SCRFD ONNX file) as SRC")
    w, _, h = args.input_size.lower().partition("x")
    if not (w.isdigit() and h.isdigit()) or int(w) < 32 or int(h) < 32 or int(w) % 32 or int(h) % 32:
        raise ArcdeployError(f"--input-size {args.input_size}: expected WxH, multiples of 32 (e.g. 640x640)")
    return {"input_size": (int(w), int(h))}


def run(args) -> int:
    from .. import build
    from ..manifest import is_detector_package, read_package_manifest

    out = build(args.src, args.output, build_options(args))
    if is_detector_package(out):
        from ..detector_package import summary_lines

        print("\n".join(summary_lines(out)))
        return 0
    print_summary(read_package_manifest(out), out)
    return 0


def build_options(args):
    """The command line's :class:`arcdeploy.options.BuildOptions`."""
    from ..options import BuildOptions
    from ..quantize import QuantRecipe

    recipe = None
    if args.int8_float or args.calib_count:
        recipe = QuantRecipe.for_this_cpu(float_precision=args.int8_float, calibration_count=args.calib_count)
    return BuildOptions(
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
        accept_calib=args.accept_calib,
        **_detector_options(args),
    )


def print_summary(m, out) -> None:
    """What was built, what it executes, how it was calibrated, and its fidelity."""
    print(f"built {m.arch} {m.engine} {m.precision} -> {out}")
    ex = m.executed
    if ex is not None and ex.layers:
        print(f"  executes: {ex.inference_precision} ({', '.join(f'{k} {v}' for k, v in ex.layers.items())})")
    cal = m.calibration
    if cal is not None:
        roles = ", ".join(cal.kept_float_why) or "none"
        print(
            f"  calibration: {cal.count} images from {cal.source}; kept in float: {len(cal.kept_float)} ops ({roles})"
        )
    fid = m.fidelity
    if fid is None:
        return
    c = fid.cosine
    state = "passed" if fid.passed else "BELOW FLOOR (" + "; ".join(fid.below_floor) + ")"
    print(
        f"  fidelity vs {fid.reference} on {c.n} {fid.images} images: "
        f"cosine mean {c.mean:.6f} min {c.min:.6f} p1 {c.p1:.6f} -> {state}"
    )
    if fid.groups is not None:
        from ..fidelity_groups import table

        print("  " + table(fid.groups, fid.floor).text().replace("\n", "\n  "))
    if m.precision_choice is not None:
        print(f"  precision auto: {m.precision_choice.why}")
