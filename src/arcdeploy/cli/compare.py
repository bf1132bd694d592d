"""arcdeploy compare PKG A.jpg B.jpg [--landmarks FILE | --detector FILE]"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="cosine similarity of two face images",
        description="Embed two images with a package and print their cosine similarity. "
        "Without --landmarks or --detector both are taken as aligned crops; "
        "with --detector each image's largest face is found and aligned.",
    )
    p.add_argument("package", metavar="PKG", help="a package folder made by arcdeploy build")
    p.add_argument("image_a", metavar="A", help="first image")
    p.add_argument("image_b", metavar="B", help="second image")
    p.add_argument(
        "--landmarks",
        metavar="FILE",
        help="5-point landmark file with rows for both images (matched by path as given, else file name)",
    )
    p.add_argument(
        "--detector",
        metavar="FILE",
        help="find each image's face (the largest) with this SCRFD or YuNet detector instead of --landmarks",
    )
    p.add_argument("--flip", action="store_true", help="add the mirrored crop's feature to each (flip test)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="engine threads")
    p.set_defaults(func=run)


def run(args) -> int:
    import numpy as np

    from .. import compare
    from ..faces.landmarks import read_landmarks
    from ..faces.pipeline import embed_images
    from ..faces.prepare import resolve_landmarks
    from ..package import load
    from .embed import cli_detector

    paths = [args.image_a, args.image_b]
    detector = cli_detector(args)
    lmks = None
    if args.landmarks:
        table = read_landmarks(args.landmarks)
        lmks = resolve_landmarks(paths, table)
        for p, pts in zip(paths, lmks or []):
            if pts is not None and not isinstance(pts, np.ndarray):
                from ..errors import ArcdeployError

                raise ArcdeployError(f"{p}: no landmarks for this image in {args.landmarks}")
    pkg = load(args.package, threads=args.threads)
    feats = embed_images(pkg, paths, landmarks=lmks, flip=args.flip, raw=True, detector=detector)
    if args.flip:
        feats = feats.sum(axis=1)
    print(f"{compare(feats[0], feats[1]):.6f}")
    return 0
