"""arcdeploy export CKPT [--arch ...] -o DIR"""
from __future__ import annotations

from ..archs import ARCHS


def register(sub) -> None:
    p = sub.add_parser("export", help="checkpoint -> ONNX (dynamic batch) + TorchScript, verified",
                       description="Export an arcface_torch backbone.pth to DIR/model.onnx, DIR/model.pt and DIR/manifest.json.")
    p.add_argument("ckpt", metavar="CKPT", help="the backbone.pth state dict")
    p.add_argument("--arch", default="auto", choices=("auto", *ARCHS), help="architecture (default: read off the keys)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (must not exist unless --force)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..exporter import export

    res = export(args.ckpt, args.output, arch=args.arch, force=args.force, opset=args.opset)
    m = res.manifest.to_json()
    err = m["verification"]["relative_error"]
    notes = f" ({'; '.join(m['source']['notes'])})" if m["source"]["notes"] else ""
    print(f"exported {m['arch']}{notes} -> {res.out_dir}")
    print(f"  model.onnx  opset {m['opset']}, dynamic batch; vs PyTorch rel. error {err['onnx']:.1e} at batch 1 and 5")
    print(f"  model.pt    TorchScript; vs PyTorch rel. error {err['torchscript']:.1e}")
    return 0
