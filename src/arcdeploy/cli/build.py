"""arcdeploy build SRC --engine ... --precision ... [--calib LIST|DIR] -o PKG"""
from __future__ import annotations

ENGINE_CHOICES = ("openvino", "onnxruntime", "torch")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "int8", "force_float32", "force_float16", "qint8_mixed_float16")


def register(sub) -> None:
    p = sub.add_parser(
        "build", help="checkpoint or export -> a verified package (engine x precision)",
        description="Compile a checkpoint (export implied), an export folder or its model.onnx into PKG for one "
                    "engine and precision, then check it per image against the fp32 PyTorch reference.")
    p.add_argument("src", metavar="SRC", help="backbone.pth, an export folder, or an exported model.onnx")
    p.add_argument("--engine", default="openvino", choices=ENGINE_CHOICES, help="inference engine (default openvino)")
    p.add_argument("--precision", default="fp32", choices=PRECISION_CHOICES, metavar="PRECISION",
                   help="fp32, fp16, bf16 or int8 (aliases force_float32, force_float16, qint8_mixed_float16)")
    p.add_argument("--calib", metavar="LIST|DIR", help="calibration images for int8 (aligned crops, or photos with --calib-landmarks)")
    p.add_argument("--calib-landmarks", metavar="FILE", help="5-point (or 68-point) landmark file for the calibration images")
    p.add_argument("--calib-count", type=int, default=300, metavar="N", help="calibration images to use (default 300; the rest check fidelity)")
    p.add_argument("--check-images", metavar="LIST|DIR", help="images for the fidelity check (default: held-out calibration images, else generated faces)")
    p.add_argument("--check-count", type=int, metavar="N", help="at most N images for the fidelity check (default 64)")
    p.add_argument("--batch", type=int, metavar="N", help="batch size to compile for (OpenVINO: a static shape)")
    p.add_argument("--threads", type=int, metavar="N", help="inference threads recorded as the package default")
    p.add_argument("--arch", default="auto", help="architecture when SRC is a checkpoint (default: read off the keys)")
    p.add_argument("--fold-preprocessing", action="store_true",
                   help="the graph takes uint8 NHWC RGB and normalises inside (openvino, onnxruntime)")
    p.add_argument("--strict", action="store_true", help="fail, writing nothing, when fidelity is below the precision's floor")
    p.add_argument("--force", action="store_true", help="replace PKG if it exists")
    p.add_argument("-o", "--output", required=True, metavar="PKG", help="package folder to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..build import build
    from ..package import read_manifest

    out = build(args.src, args.output, engine=args.engine, precision=args.precision, calib=args.calib,
                calib_landmarks=args.calib_landmarks, calib_count=args.calib_count, batch=args.batch,
                threads=args.threads, arch=args.arch, force=args.force, strict=args.strict,
                fold_preprocessing=args.fold_preprocessing, check_images=args.check_images,
                check_count=args.check_count)
    m = read_manifest(out)
    fid = m["fidelity"]
    c = fid["cosine"]
    print(f"built {m['arch']} {m['engine']} {m['precision']} -> {out}")
    if m.get("openvino", {}).get("executed"):
        ex = m["openvino"]["executed"]
        print(f"  executes: {ex['inference_precision']} ({', '.join(f'{k} {v}' for k, v in ex['layers'].items())})")
    if m.get("calibration"):
        cal = m["calibration"]
        print(f"  calibration: {cal['count']} images from {cal['source']}; kept in float: {len(cal.get('kept_float', []))} ops (head)")
    state = "passed" if fid["passed"] else "BELOW FLOOR (" + "; ".join(fid["below_floor"]) + ")"
    print(f"  fidelity vs fp32 PyTorch on {c['n']} {fid['images']} images: cosine mean {c['mean']:.6f} "
          f"min {c['min']:.6f} p1 {c['p1']:.6f} -> {state}")
    return 0
