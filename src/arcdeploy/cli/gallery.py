"""arcdeploy gallery add|search|remove|info GALLERY ... (a folder, or postgresql://...)"""

from __future__ import annotations

import sys

EXIT_SOME_FAILED = 3

GALLERY_HELP = (
    "a folder (FAISS + SQLite; made by the first add) or postgresql://USER@HOST/DB "
    "(PostgreSQL with the pgvector extension)"
)


def register(sub) -> None:
    p = sub.add_parser(
        "gallery",
        help="1:N identification: enrol identities into a gallery, search who a face is",
        description="A face gallery: enrolled embeddings under identities, searched by cosine (an identity's "
        "score is the best of its samples). The gallery records the model it was made with: packages of that "
        "model at any precision (fp32, bf16, int8) may add and search; another model is refused.",
    )
    gsub = p.add_subparsers(dest="gallery_command", metavar="ACTION")
    gsub.required = True

    a = gsub.add_parser(
        "add",
        help="embed images (or take features) and enrol them under their identities",
        description="Enrol images or feature rows. Each row's identity comes from --labels (one per line, in "
        "input order) or, with --images DIR, from DIR/<identity>/... . Images that cannot be used are named on "
        "stderr and the rest are enrolled (exit status 3). A change is whole or not at all: an interrupted add "
        "leaves the gallery as it was; a second writer is refused.",
    )
    a.add_argument("gallery", metavar="GALLERY", help=GALLERY_HELP)
    _inputs(a)
    a.add_argument(
        "--labels", metavar="FILE", help="identities, one per line in input order (needed with a list or --features)"
    )
    a.add_argument(
        "--index",
        choices=("flat", "int8", "hnsw"),
        default=None,
        help="for a new gallery: flat (exact inner product, default), int8 (8-bit scalar quantizer, a quarter of "
        "the memory; folders only) or hnsw (approximate graph search for large galleries)",
    )
    a.set_defaults(func=run_add)

    s = gsub.add_parser(
        "search",
        help="the top-k identities of each query image or feature row",
        description="Search each query: the top-k identities by cosine with their best sample. Below "
        "--threshold an identity is not a match; a query with no match left is unknown (an empty match list). "
        "Images that cannot be used are named on stderr and left out (exit status 3).",
    )
    s.add_argument("gallery", metavar="GALLERY", help=GALLERY_HELP)
    _inputs(s)
    s.add_argument("--top-k", type=int, default=5, metavar="K", help="identities per query (default 5)")
    s.add_argument("--threshold", type=float, default=None, metavar="T", help="the lowest cosine that is a match")
    s.add_argument(
        "--json",
        metavar="FILE",
        help='write {"results": [{"query": ..., "matches": [{"identity": ..., "score": ...}]}]}',
    )
    s.add_argument("--force", action="store_true", help="replace an existing --json FILE")
    s.set_defaults(func=run_search)

    r = gsub.add_parser("remove", help="remove an identity and its samples", description="Remove one identity.")
    r.add_argument("gallery", metavar="GALLERY", help=GALLERY_HELP)
    r.add_argument("--identity", required=True, metavar="ID", help="the identity to remove")
    r.set_defaults(func=run_remove)

    i = gsub.add_parser(
        "info",
        help="identities, vectors, model, store and index",
        description="What a gallery holds and which model made it.",
    )
    i.add_argument("gallery", metavar="GALLERY", help=GALLERY_HELP)
    i.add_argument("--json", metavar="FILE", help="also write it as JSON")
    i.add_argument("--force", action="store_true", help="replace an existing --json FILE")
    i.set_defaults(func=run_info)


def _inputs(p) -> None:
    p.add_argument("--package", required=True, metavar="PKG", help="a package made by arcdeploy build")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--images",
        metavar="LIST|DIR",
        help="a folder (searched recursively, sorted) or a text file with one image path per line",
    )
    src.add_argument("--features", metavar="F.npy", help="embeddings [N, D] made by this model (arcdeploy embed)")
    p.add_argument("--landmarks", metavar="FILE", help="5-point landmarks of the images (the IJB form)")
    p.add_argument(
        "--detector",
        metavar="FILE",
        help="find each image's largest face with this detector file (SCRFD, YuNet)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _say_failures(failures) -> None:
    from ..faces.io import display_name

    for f in failures:
        print(f"arcdeploy gallery: skipped {display_name(f.path)}: {display_name(f.reason)}", file=sys.stderr)


def _check_inputs(args) -> None:
    from ..errors import ArcdeployError
    from ..faces.prepare import exclusive_landmarks_detector

    if args.features is not None and (args.landmarks or args.detector):
        flag = "--landmarks" if args.landmarks else "--detector"
        raise ArcdeployError(f"{flag} goes with --images, not --features (features are embeddings already)")
    exclusive_landmarks_detector(args.landmarks, args.detector)


def _read_features(path: str):
    import numpy as np

    from ..errors import ArcdeployError

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise ArcdeployError(f"{path}: no such features file") from None
    except (OSError, ValueError, EOFError) as exc:
        raise ArcdeployError(f"{path}: not a .npy array of features ({exc})") from None


def _image_inputs(args, labels_needed: bool):
    """Paths, the root they are named relative to, their names, and (when needed) identities."""
    from pathlib import Path

    from ..errors import ArcdeployError
    from ..faces.io import display_name, images_root, list_images
    from ..gallery.api import identities_from_folder, read_labels

    paths = list_images(args.images)
    root = images_root(args.images)
    names = []
    for p in paths:
        try:
            names.append(display_name(Path(p).relative_to(root).as_posix()))
        except ValueError:
            names.append(display_name(str(p)))
    identities = None
    if labels_needed:
        if args.labels:
            identities = read_labels(args.labels, len(paths))
        elif Path(args.images).is_dir():
            identities = identities_from_folder(args.images, paths)
        else:
            raise ArcdeployError(f"{args.images}: a list gives no identities; give --labels FILE (one per line)")
    return paths, root, names, identities


def run_add(args) -> int:
    from pathlib import Path

    from ..errors import ArcdeployError
    from ..gallery import open_gallery
    from ..gallery.api import read_labels
    from ..package import load

    _check_inputs(args)
    pkg = load(args.package)
    with open_gallery(args.gallery, write=True, index=args.index) as gallery:
        gallery.check_package(pkg)  # before any image is read
        if args.images is not None:
            paths, root, names, identities = _image_inputs(args, labels_needed=True)
            assert identities is not None
            res = gallery.add_images(
                pkg,
                paths,
                identities,
                landmarks=args.landmarks,
                detector=args.detector,
                root=root,
                samples=names,
                progress=not args.quiet,
            )
            n, what = len(paths), "images"
        else:
            feats = _read_features(args.features)
            if not args.labels:
                raise ArcdeployError("--features: give --labels FILE (one identity per row, in row order)")
            labels = read_labels(args.labels, len(feats) if feats.ndim >= 1 else 1)
            stem = Path(args.features).name
            res = gallery.add(feats, labels, pkg, samples=[f"{stem}[{i}]" for i in range(len(labels))], where=stem)
            n, what = len(labels), "rows"
        info = gallery.info()
    _say_failures(res.failures)
    print(
        f"enrolled {res.added} of {n} {what} under {len(res.identities)} identities; {info.location} now holds "
        f"{info.vectors} vectors of {info.identities} identities ({info.index} index)"
    )
    if res.failures:
        print(f"arcdeploy gallery: {len(res.failures)} of {n} {what} could not be enrolled", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def run_search(args) -> int:
    from pathlib import Path

    from ..files import refuse_existing, write_json_atomic
    from ..gallery import open_gallery
    from ..package import load

    _check_inputs(args)
    if args.json:
        refuse_existing(args.json, args.force)
    pkg = load(args.package)
    with open_gallery(args.gallery) as gallery:
        gallery.check_package(pkg)
        if args.images is not None:
            paths, root, names, _ = _image_inputs(args, labels_needed=False)
            results, failures = gallery.search_images(
                pkg,
                paths,
                top_k=args.top_k,
                threshold=args.threshold,
                landmarks=args.landmarks,
                detector=args.detector,
                root=root,
                queries=names,
                progress=not args.quiet,
            )
        else:
            feats = _read_features(args.features)
            stem = Path(args.features).name
            rows = len(feats) if feats.ndim == 2 else 1
            results, failures = gallery.search(
                feats, pkg, args.top_k, args.threshold, queries=[f"{stem}[{i}]" for i in range(rows)], where=stem
            )
    _say_failures(failures)
    for r in results:
        if r.unknown:
            print(f"{r.query}\tunknown")
            continue
        for rank, m in enumerate(r.matches, 1):
            print(f"{r.query}\t{rank}\t{m.identity}\t{m.score:.4f}")
    if args.json:
        write_json_atomic(args.json, {"results": [r.to_json() for r in results]}, force=args.force)
    if failures:
        total = len(results) + len(failures)
        print(f"arcdeploy gallery: {len(failures)} of {total} queries could not be searched", file=sys.stderr)
        return EXIT_SOME_FAILED
    return 0


def run_remove(args) -> int:
    from ..gallery import open_gallery

    open_gallery(args.gallery).close()  # a gallery that is not there is an error, not a new one
    with open_gallery(args.gallery, write=True) as gallery:
        gone = gallery.remove(args.identity)
        info = gallery.info()
    print(
        f"removed {args.identity!r} ({gone} vectors); {info.location} now holds {info.vectors} vectors of "
        f"{info.identities} identities"
    )
    return 0


def run_info(args) -> int:
    from ..files import refuse_existing, write_json_atomic
    from ..gallery import open_gallery

    if args.json:
        refuse_existing(args.json, args.force)
    with open_gallery(args.gallery) as gallery:
        info = gallery.info()
    m = info.model
    print(f"gallery     {info.location}")
    print(f"store       {info.store}")
    print(f"index       {info.index}")
    print(f"model       {m.describe() if m else '(none yet)'}")
    print(f"identities  {info.identities}")
    print(f"vectors     {info.vectors}")
    for add in info.adds:
        made = f"{add['engine']} {add['precision']}" if add.get("engine") else "features"
        print(f"added       {add['time']}  {add['count']} vectors  {made}  {add['package']}")
    if args.json:
        write_json_atomic(args.json, info.to_json(), force=args.force)
    return 0
