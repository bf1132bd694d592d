"""arcdeploy embed PKG --images LIST|DIR [--landmarks FILE | --detector FILE [--all-faces]] [--flip] [--raw]
[--force] [--ray [ADDR]] -o FEATS.npy"""

from __future__ import annotations

import sys

from ..faces.detectors.base import DECODES, DEFAULT_DECODE
from ..faces.detectors.registry import DEFAULT_DETECTOR_ENGINE, DETECTOR_ENGINES
from .ray_args import add_ray_arguments, print_cluster_summary, progress_lines, ray_options

EXIT_SOME_FAILED = 3

DECODE_HELP = (
    "with a detector: how photos are decoded to find faces: full (default: insightface's pixels, "
    "so its landmarks), reduced (JPEGs at least twice the detector's input decoded at 1/2, 1/4 "
    "or 1/8 with libjpeg's DCT scaling: faster on large photos, landmarks a few tenths of a "
    "detector pixel off the full decode's; photos with small faces are decoded in full anyway) or "
    "planes (JPEGs at least twice the detector's input decoded to their Y, Cb, Cr planes by the "
    "system's libturbojpeg and sampled in colour only where the canvas and the crops need them: "
    "~20%% less decoding; canvas pixels within a grey level or two of the full decode's, which moves "
    "SCRFD's landmarks by ~0.1%% of the eye distance, more on faces under 10 detector pixels between "
    "the eyes; without libturbojpeg: full)"
)


def register(sub) -> None:
    p = sub.add_parser(
        "embed",
        help="images -> embeddings (.npy), rows in input order",
        description="Embed images with a built package. Rows are L2-normalised float32 in input order "
        "([N, 512]; with --flip [N, 2, 512]: each image and its mirrored aligned crop). "
        "Without --landmarks the images are taken as aligned crops (at least 32x32; resized to "
        "112x112 if needed); with --detector each image's faces are found, aligned and embedded in "
        "one pass: its best (largest) face, or with --all-faces one row per face (image order, "
        "largest first) indexed in FEATS.faces.tsv (row, image, path, face, box, score). An image "
        "that cannot be used (unreadable, above 50 megapixels or ARCDEPLOY_MAX_PIXELS, no or "
        "implausible landmarks, no face found, a non-finite model output) gets a NaN row (with "
        "--all-faces: no row), is named on stderr and listed in FEATS.failures.tsv (index, path, "
        "reason; names as their bytes, with backslash, tab and newline escaped); the exit status is "
        "then 3. "
        "Work is saved in FEATS.npy.parts/ as it goes: rerunning the same command after an "
        "interruption continues where it stopped. An existing FEATS.npy, FEATS.failures.tsv or "
        "FEATS.faces.tsv is only replaced with --force.",
    )
    p.add_argument("package", metavar="PKG", help="a package folder made by arcdeploy build")
    p.add_argument(
        "--images",
        required=True,
        metavar="LIST|DIR",
        help="a folder (searched recursively for jpg/jpeg/png/bmp/webp, sorted) or a text file "
        "with one image path per line (relative to the list's folder)",
    )
    p.add_argument(
        "--landmarks",
        metavar="FILE",
        help="5-point landmarks: lines 'name x1 y1 ... x5 y5 [score]' (or 68 points). "
        "An image's row is found by its path relative to the images folder (or the list "
        "file's folder), else by its file name",
    )
    add_detector_arguments(p)
    p.add_argument("--flip", action="store_true", help="also embed the mirrored crop: output [N, 2, 512]")
    p.add_argument("--raw", action="store_true", help="un-normalised features")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        metavar="N",
        help="images per inference batch (default: the package's batch, else 32)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="engine threads (default: the engine's)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="decode/align threads (default: number of CPUs, one more with --detector, at most 8)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="N",
        help="images per saved chunk for resuming (rounded up to whole batches; default 2048)",
    )
    p.add_argument(
        "--restart", action="store_true", help="discard saved partial work (FEATS.npy.parts/) instead of resuming it"
    )
    p.add_argument("--force", action="store_true", help="replace an existing output (and its .failures.tsv)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="FEATS.npy", help="output .npy file")
    add_ray_arguments(p)
    p.set_defaults(func=run)


def add_detector_arguments(p) -> None:
    """--detector and its settings, for a command that embeds a list of photos."""
    p.add_argument(
        "--detector",
        metavar="FILE",
        help="find the faces with this detector instead of --landmarks: SCRFD (insightface ONNX with "
        "keypoints) or YuNet (OpenCV Zoo); the kind is recognised from the file",
    )
    p.add_argument(
        "--all-faces", action="store_true", help="with --detector: one row per face found instead of one per image"
    )
    add_detector_settings(p)
    p.add_argument(
        "--detector-engine",
        choices=DETECTOR_ENGINES,
        default=None,
        help="with --detector: what runs SCRFD (default onnxruntime); YuNet always runs in OpenCV",
    )


def add_detector_settings(p) -> None:
    """What a --detector keeps: --min-face, --det-threshold and --decode (embed, serve)."""
    p.add_argument(
        "--min-face",
        type=float,
        default=None,
        metavar="PX",
        help="with --detector: leave out faces whose box's shorter side is under PX pixels",
    )
    p.add_argument(
        "--det-threshold",
        type=float,
        default=None,
        metavar="T",
        help="with --detector: minimum detection score (default 0.5 for SCRFD, 0.6 for YuNet)",
    )
    p.add_argument("--decode", choices=DECODES, default=None, help=DECODE_HELP)


def run(args) -> int:
    from ..errors import ArcdeployError
    from ..faces.io import display_name, images_root, list_images
    from ..faces.job import WORKERS_PER_CPU, EmbedJob
    from ..faces.pipeline import EmbedResult
    from ..files import refuse_existing
    from ..machine import check_threads
    from ..package import load

    for name in ("batch", "threads", "workers", "chunk_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ArcdeployError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    ray = ray_options(args, threads=args.threads, workers=args.workers)
    refuse_existing(args.output, args.force)  # before any work: the images may take hours
    detector = cli_detector(args)
    # on Ray, --threads is each actor's (checked against the cluster's nodes), not this machine's
    # (with --detector, recognition keeps every core beside the workers: measured, see faces/detectors/registry.py)
    threads = None if ray is not None else args.threads
    pkg = load(args.package, threads=threads)
    check_threads(args.workers, "workers", per_cpu=WORKERS_PER_CPU)
    paths = list_images(args.images)
    job = EmbedJob.create(
        paths,
        landmarks=args.landmarks,
        detector=detector,
        root=images_root(args.images),
        all_faces=args.all_faces,
        flip=args.flip,
        raw=args.raw,
        batch=args.batch,
        chunk_rows=args.chunk_size,
        workers=args.workers,
        output=args.output,
        resume=not args.restart,
        force=args.force,
        progress=not args.quiet,
    )

    def report(f):
        msg = f"arcdeploy embed: skipped {display_name(f.path)}: {display_name(f.reason)}"
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        except ImportError:
            print(msg, file=sys.stderr)

    res: EmbedResult
    if ray is not None:  # the same job on a Ray cluster: --threads and --workers apply to each actor
        from ..distributed import run_on_ray

        res = run_on_ray(job, pkg, ray, on_failure=report, on_progress=progress_lines("embed", not args.quiet))
    else:
        from ..faces.pipeline import run_local

        res = run_local(job, pkg, on_failure=report)
    return _summary(res, len(paths))


def _summary(res, n: int) -> int:
    from ..faces.io import display_name

    failed = len({f.index for f in res.failures})
    resumed = f" ({res.resumed_rows} resumed from saved work)" if res.resumed_rows else ""
    out = f"{display_name(str(res.output))} {list(res.features.shape)}"
    if res.faces is not None:
        images = len({fr.image for fr in res.faces})
        print(
            f"embedded {len(res.faces)} faces from {images} of {n} images -> {out}{resumed}; "
            f"rows indexed in {display_name(str(res.faces_path))}"
        )
    else:
        print(f"embedded {n - failed} of {n} images -> {out}{resumed}")
    print_cluster_summary(res)
    if res.failures:
        what = "no rows" if res.faces is not None else "NaN rows"
        print(
            f"arcdeploy embed: {failed} of {n} images failed ({what}), listed in "
            f"{display_name(str(res.failures_path))}",
            file=sys.stderr,
        )
        return EXIT_SOME_FAILED
    return 0


def cli_detector(args, landmarks_flag: str = "--landmarks"):
    """The detector the options name, as a :class:`~arcdeploy.faces.detectors.DetectorSpec`
    (its file checked to be a detector now, before any other work), or None; detector options
    without --detector and landmarks with a detector are errors."""
    from ..errors import ArcdeployError
    from ..faces.detectors import DETECTOR_THREADS, DetectorSpec, inspect_detector
    from ..faces.prepare import exclusive_landmarks_detector

    exclusive_landmarks_detector(args.landmarks, args.detector, landmarks_flag, "--detector")
    given = [
        flag
        for flag, value in (
            ("--all-faces", getattr(args, "all_faces", False)),
            ("--min-face", getattr(args, "min_face", None)),
            ("--det-threshold", getattr(args, "det_threshold", None)),
            ("--detector-engine", getattr(args, "detector_engine", None)),
            ("--decode", getattr(args, "decode", None)),
        )
        if value
    ]
    if args.detector is None:
        if given:
            raise ArcdeployError(f"{given[0]} needs --detector FILE (a face detector to find the faces)")
        return None
    thr = getattr(args, "det_threshold", None)
    if thr is not None and not 0.0 <= thr <= 1.0:
        raise ArcdeployError(f"--det-threshold must be between 0 and 1, got {thr:g}")
    min_face = getattr(args, "min_face", None)
    min_face = 0.0 if min_face is None else min_face
    if not min_face >= 0:  # NaN too: it would drop every face
        raise ArcdeployError(f"--min-face must be a number of pixels, 0 or more, got {min_face:g}")
    spec = DetectorSpec(
        args.detector,
        engine=getattr(args, "detector_engine", None) or DEFAULT_DETECTOR_ENGINE,
        threshold=thr,
        min_face=min_face,
        threads=DETECTOR_THREADS,
        decode=getattr(args, "decode", None) or DEFAULT_DECODE,
    )
    inspect_detector(spec.path)
    return spec
