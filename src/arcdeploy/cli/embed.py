"""arcdeploy embed PKG --images LIST|DIR [--landmarks FILE] [--flip] [--raw] [--force] [--ray [ADDR]] -o FEATS.npy"""
from __future__ import annotations

import sys

from .ray_args import add_ray_arguments, print_cluster_summary, progress_lines, ray_options

EXIT_SOME_FAILED = 3


def register(sub) -> None:
    p = sub.add_parser(
        "embed", help="images -> embeddings (.npy), rows in input order",
        description="Embed images with a built package. Rows are L2-normalised float32 in input order "
                    "([N, 512]; with --flip [N, 2, 512]: each image and its mirrored aligned crop). "
                    "Without --landmarks the images are taken as aligned crops (at least 32x32; resized to "
                    "112x112 if needed). An image that cannot be used (unreadable, above 50 megapixels or "
                    "ARCDEPLOY_MAX_PIXELS, no or implausible landmarks, a non-finite model output) gets a NaN "
                    "row, is named on stderr and listed in FEATS.failures.tsv (index, path, reason; names as "
                    "their bytes, with backslash, tab and newline escaped); the exit status is then 3. "
                    "Work is saved in FEATS.npy.parts/ as it goes: rerunning the same command after an "
                    "interruption continues where it stopped. An existing FEATS.npy or FEATS.failures.tsv "
                    "is only replaced with --force.")
    p.add_argument("package", metavar="PKG", help="a package folder made by arcdeploy build")
    p.add_argument("--images", required=True, metavar="LIST|DIR",
                   help="a folder (searched recursively for jpg/jpeg/png/bmp/webp, sorted) or a text file "
                        "with one image path per line (relative to the list's folder)")
    p.add_argument("--landmarks", metavar="FILE",
                   help="5-point landmarks: lines 'name x1 y1 ... x5 y5 [score]' (or 68 points). "
                        "An image's row is found by its path relative to the images folder (or the list "
                        "file's folder), else by its file name")
    p.add_argument("--flip", action="store_true", help="also embed the mirrored crop: output [N, 2, 512]")
    p.add_argument("--raw", action="store_true", help="un-normalised features")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="images per inference batch (default: the package's batch, else 32)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="engine threads (default: the engine's)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="decode/align threads (default: number of CPUs, at most 8)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="N",
                   help="images per saved chunk for resuming (rounded up to whole batches; default 2048)")
    p.add_argument("--restart", action="store_true",
                   help="discard saved partial work (FEATS.npy.parts/) instead of resuming it")
    p.add_argument("--force", action="store_true",
                   help="replace an existing output (and its .failures.tsv)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("-o", "--output", required=True, metavar="FEATS.npy", help="output .npy file")
    add_ray_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ArcdeployError
    from ..faces.io import display_name, images_root, list_images
    from ..faces.pipeline import embed_files
    from ..files import refuse_existing
    from ..package import load

    for name in ("batch", "threads", "workers", "chunk_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ArcdeployError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    ray = ray_options(args, threads=args.threads, workers=args.workers)
    refuse_existing(args.output, args.force)  # before any work: the images may take hours
    paths = list_images(args.images)
    pkg = load(args.package, threads=args.threads)
    if ray is not None:  # the same job on a Ray cluster: --threads and --workers apply to each actor
        from functools import partial

        from ..distributed import embed_files_on_ray

        embed_files = partial(embed_files_on_ray, ray=ray, on_progress=progress_lines("embed", not args.quiet))

    def report(f):
        msg = f"arcdeploy embed: skipped {display_name(f.path)}: {display_name(f.reason)}"
        try:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)
        except ImportError:
            print(msg, file=sys.stderr)

    res = embed_files(pkg, paths, landmarks=args.landmarks, flip=args.flip, raw=args.raw, batch=args.batch,
                      output=args.output, resume=not args.restart, progress=not args.quiet,
                      workers=args.workers, root=images_root(args.images), chunk_rows=args.chunk_size,
                      on_failure=report, force=args.force)
    n = len(paths)
    good = n - len(res.failures)
    resumed = f" ({res.resumed_rows} resumed from saved work)" if res.resumed_rows else ""
    print(f"embedded {good} of {n} images -> {display_name(str(res.output))} {list(res.features.shape)}{resumed}")
    print_cluster_summary(res)
    if res.failures:
        print(f"arcdeploy embed: {len(res.failures)} of {n} images failed (NaN rows), listed in "
              f"{display_name(str(res.failures_path))}", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0
