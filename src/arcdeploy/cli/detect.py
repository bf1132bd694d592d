"""arcdeploy detect IMAGES --detector FILE [--all-faces] [--min-face PX] [--threshold T] -o FACES.txt"""

from __future__ import annotations

import sys

from ..faces.detectors.base import DECODES, DEFAULT_DECODE
from ..faces.detectors.registry import DEFAULT_DETECTOR_ENGINE, DETECTOR_ENGINES
from .embed import DECODE_HELP

EXIT_SOME_FAILED = 3


def register(sub) -> None:
    p = sub.add_parser(
        "detect",
        help="images -> 5-point landmark rows (FACES.txt) with a face detector",
        description="Find faces with an SCRFD (insightface, ONNX with keypoints) or YuNet (OpenCV Zoo) detector "
        "and write one row per image: 'name x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 score' (left eye, right "
        "eye, nose, left and right mouth corner as seen in the image, in the image's pixels). Names "
        "are relative to the images folder (or the list file's folder), as 'embed --landmarks' "
        "expects. The best face is the largest; with --all-faces every face gets a row, largest "
        "first. An image where nothing is found is tried once more inside a black border (a face "
        "that fills a tight crop is too large for the detector otherwise). FACES.boxes.tsv lists "
        "name, face index, box and score. Images without a face, or that cannot be read, are named "
        "on stderr and listed in FACES.failures.tsv (index, path, reason); the exit status is then 3.",
    )
    p.add_argument(
        "images",
        metavar="IMAGES",
        help="an image, a folder (searched recursively for jpg/jpeg/png/bmp/webp, sorted) or a text "
        "file with one image path per line (relative to the list's folder)",
    )
    p.add_argument(
        "--detector",
        required=True,
        metavar="FILE",
        help="SCRFD ONNX with keypoints (e.g. det_500m.onnx, det_10g.onnx) or YuNet "
        "(face_detection_yunet_2023mar*.onnx); the kind is recognised from the file",
    )
    p.add_argument("--all-faces", action="store_true", help="one row per face found, largest first")
    p.add_argument(
        "--min-face",
        type=float,
        default=0.0,
        metavar="PX",
        help="leave out faces whose box's shorter side is under PX pixels (default: keep all)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="T",
        help="minimum detection score (default: 0.5 for SCRFD, as insightface; 0.6 for YuNet)",
    )
    p.add_argument(
        "--engine",
        choices=DETECTOR_ENGINES,
        default=DEFAULT_DETECTOR_ENGINE,
        help="what runs SCRFD (default: onnxruntime); YuNet always runs in OpenCV",
    )
    p.add_argument("--decode", choices=DECODES, default=DEFAULT_DECODE, help=DECODE_HELP)
    p.add_argument("--threads", type=int, default=None, metavar="N", help="engine threads (default: the engine's)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="images decoded and detected at once (default: number of CPUs, at most 4)",
    )
    p.add_argument("--force", action="store_true", help="replace FACES.txt if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="FACES.txt", help="output landmark file")
    p.set_defaults(func=run)


def _say(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:
        print(msg, file=sys.stderr)


def run(args) -> int:
    from ..errors import ArcdeployError
    from ..faces.detect import detect_files, write_faces
    from ..faces.detectors import open_detector
    from ..faces.io import images_root, list_images
    from ..faces.types import Failure
    from ..files import refuse_existing

    for name in ("threads", "workers"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ArcdeployError(f"--{name} must be at least 1, got {v}")
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ArcdeployError(f"--threshold must be between 0 and 1, got {args.threshold:g}")
    if not args.min_face >= 0:  # NaN too: it would drop every face
        raise ArcdeployError(f"--min-face must be a number of pixels, 0 or more, got {args.min_face:g}")
    refuse_existing(args.output, args.force)  # before the work, not after it
    paths = list_images(args.images)
    detector = open_detector(
        args.detector,
        engine=args.engine,
        threshold=args.threshold,
        min_face=args.min_face,
        threads=args.threads,
        decode=args.decode,
    )
    bar = None
    if not args.quiet and sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(paths), unit="img", desc="detect", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass

    def on_image(index, out) -> None:
        if isinstance(out, Failure):
            _say(f"arcdeploy detect: skipped {out.path}: {out.reason}")
        if bar is not None:
            bar.update(1)

    try:
        result = detect_files(
            detector,
            paths,
            root=images_root(args.images),
            all_faces=args.all_faces,
            workers=args.workers,
            on_image=on_image,
        )
    finally:
        if bar is not None:
            bar.close()
    written = write_faces(args.output, result, force=args.force)
    n = len(paths)
    good = n - len(result.failures)
    rows = sum(len(f) for f in result.faces)
    plural = "s" if rows != 1 else ""
    print(f"{detector.describe()}: faces in {good} of {n} images, {rows} row{plural} -> {written['faces']}")
    if result.failures:
        print(
            f"arcdeploy detect: {len(result.failures)} of {n} images have no row, listed in {written['failures']}",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return 0
