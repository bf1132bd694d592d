"""arcdeploy export CKPT|MODEL.onnx [--arch ...] [--input-mean M --input-std S --bgr] -o DIR"""

from __future__ import annotations

from ..archs import ARCHS


def add_convention_options(p) -> None:
    """--input-mean / --input-std / --bgr: what a foreign ONNX model expects, when the user knows better."""
    p.add_argument(
        "--input-mean",
        metavar="M[,M,M]",
        help="foreign ONNX: the model takes (x - M) / S (one value or R,G,B); replaces the detected "
        "normalisation (default: read off the graph, else 127.5)",
    )
    p.add_argument(
        "--input-std", metavar="S[,S,S]", help="foreign ONNX: see --input-mean (default: detected, else 127.5)"
    )
    p.add_argument(
        "--bgr",
        action="store_true",
        default=None,
        help="foreign ONNX: the model takes BGR images (default: RGB, as insightface's ArcFace models)",
    )


def convention_options(args) -> dict:
    """The foreign-ONNX options the user gave (none given: an empty dict)."""
    opts = {"input_mean": args.input_mean, "input_std": args.input_std, "bgr": args.bgr}
    return {k: v for k, v in opts.items() if v is not None}


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="checkpoint or foreign ONNX -> verified ONNX (dynamic batch) + fp32 reference",
        description="Export an arcface_torch backbone.pth to DIR/model.onnx, DIR/model.pt and "
        "DIR/manifest.json; or take a foreign ArcFace-family ONNX file, detect and record "
        "its input convention, and write DIR/model.onnx (dynamic batch), "
        "DIR/source.onnx (the fp32 reference) and DIR/manifest.json.",
    )
    p.add_argument("ckpt", metavar="CKPT", help="the backbone.pth state dict, or a recognition MODEL.onnx")
    p.add_argument("--arch", default="auto", choices=("auto", *ARCHS), help="architecture (default: read off the keys)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output folder (must not exist unless --force)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset of a checkpoint's export (default 17)")
    add_convention_options(p)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..exporter import export

    res = export(args.ckpt, args.output, arch=args.arch, force=args.force, opset=args.opset, **convention_options(args))
    m = res.manifest
    err = m.verification.relative_error
    if m.source.kind == "onnx":
        det = m.source.detected or {}
        out = m.output
        print(f"exported {m.arch} -> {res.out_dir}")
        print(f"  input       {m.reference.input.describe() if m.reference.input else m.input.describe()}")
        print(f"              ({det['normalization']['how']})")
        for line in m.source.model_changes or []:
            print(f"  model.onnx  {line}")
        print(f"  output      {out.name} [N, {out.dim}], {'L2-normalised' if out.normalized else 'raw'}")
        print(
            f"  batch       source: {det['batch']['source']}; model.onnx: dynamic, vs source.onnx rel. error "
            f"{err['onnx']:.1e} at batch {', '.join(str(b) for b in m.verification.batches)}"
        )
        return 0
    notes = f" ({'; '.join(m.source.notes)})" if m.source.notes else ""
    print(f"exported {m.arch}{notes} -> {res.out_dir}")
    print(f"  model.onnx  opset {m.opset}, dynamic batch; vs PyTorch rel. error {err['onnx']:.1e} at batch 1 and 5")
    print(f"  model.pt    TorchScript; vs PyTorch rel. error {err['torchscript']:.1e}")
    return 0
