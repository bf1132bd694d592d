"""arcdeploy serve PKG [--detector FILE] [--host 127.0.0.1] [--port 8000] [--max-batch N] [--max-wait-ms MS]
[--max-queue N] [--threads N] [--ray [ADDRESS]] [--replicas N]"""

from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="the package as an HTTP service (batches faces across requests)",
        description="Serve a package over HTTP: POST /v1/embed (multipart parts named 'image', or JSON "
        "{'images': [base64, ...]}; fields aligned=true, all_faces=true), POST /v1/compare (parts a and b), "
        "POST /v1/search (with --gallery), "
        "GET /healthz (200 once the model is warm), GET /v1/model, GET /metrics (Prometheus), GET /docs. "
        "Images are decoded, their faces found (--detector) and aligned in a worker pool as 'arcdeploy "
        "embed' does; the faces of concurrent requests are gathered into engine calls of up to "
        "--max-batch faces. SIGTERM or SIGINT stops accepting, answers every accepted request and exits 0. "
        "Needs pip install 'arcdeploy[serve]'.",
    )
    p.add_argument("package", metavar="PKG", help="a package folder made by arcdeploy build")
    _add_input_arguments(p)
    _add_serving_arguments(p)
    g = p.add_argument_group(
        "Ray Serve",
        "Serve on a Ray cluster instead (needs pip install 'arcdeploy[ray]'): the same application in "
        "each replica, the package shipped through Ray's object store, replicas spread over the nodes, "
        "HTTP through Ray Serve's proxy on --host/--port.",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="Ray address (auto, HOST:PORT, ray://HOST:PORT); without one, RAY_ADDRESS when set, else a new local Ray",
    )
    g.add_argument(
        "--replicas", type=int, default=None, metavar="N", help="with --ray: replicas (default: one per node)"
    )
    p.set_defaults(func=run)


def _add_input_arguments(p) -> None:
    """What requests are matched against: the detector for photos, the gallery for searches."""
    from .embed import add_detector_settings

    p.add_argument(
        "--detector",
        metavar="FILE",
        help="find faces in photos with this detector (SCRFD ONNX or YuNet); without it, images are taken as "
        "aligned 112x112 crops",
    )
    add_detector_settings(p)
    p.add_argument(
        "--gallery",
        metavar="GALLERY",
        default=None,
        help="a gallery of the same model (a folder, or postgresql://...) searched by POST /v1/search",
    )


def _add_serving_arguments(p) -> None:
    """Where it listens, how faces are batched, and the limits that keep it healthy under load."""
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: all)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free port, printed)")
    p.add_argument(
        "--max-batch",
        type=int,
        default=None,
        metavar="N",
        help="faces per engine call, gathered across requests (default: the package's batch, else 32); "
        "1 turns batching off",
    )
    p.add_argument(
        "--max-wait-ms",
        type=float,
        default=None,
        metavar="MS",
        help="how long the oldest waiting face may wait for a fuller batch (default 5)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        metavar="N",
        help="embedding requests accepted at once; beyond, 503 with Retry-After (default 256)",
    )
    p.add_argument("--threads", type=int, default=None, metavar="N", help="engine threads (default: the engine's)")
    p.add_argument(
        "--engine-streams",
        type=int,
        default=None,
        metavar="N",
        help="engine calls in flight at once (default 1); above 1, OpenVINO packages are compiled for "
        "throughput with N streams",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="threads that decode, detect and align (default: number of CPUs, 2 to 8)",
    )
    p.add_argument(
        "--max-body-mb", type=float, default=None, metavar="MB", help="largest request body (default 64); 413 beyond"
    )
    p.add_argument(
        "--timeout", type=float, default=None, metavar="S", help="longest a request is worked on (default 60); 504"
    )
    p.add_argument("--access-log", action="store_true", help="one log line per request (uvicorn's access log)")


def _settings(args):
    from ..serve.app import ServeSettings

    options: dict = {}
    for name in ("max_batch", "max_wait_ms", "max_queue", "workers", "engine_streams"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.max_body_mb is not None:
        options["max_body_bytes"] = max(1, int(args.max_body_mb * (1 << 20)))
    if args.timeout is not None:
        options["timeout_s"] = args.timeout
    return ServeSettings(**options)


def run(args) -> int:
    from ..errors import ArcdeployError
    from ..serve import require_serve

    if args.threads is not None and args.threads < 1:
        raise ArcdeployError(f"--threads must be at least 1, got {args.threads}")
    if not 0 <= args.port <= 65535:
        raise ArcdeployError(f"--port must be 0 to 65535, got {args.port}")
    if args.replicas is not None and (args.ray is None or args.replicas < 1):
        raise ArcdeployError("--replicas needs --ray" if args.ray is None else "--replicas must be at least 1")
    require_serve()
    detector = _open_detector(args)
    settings = _settings(args)
    if args.ray is not None:
        from ..gallery.pgvector_store import is_postgres_url
        from ..serve.ray_serve import serve_on_ray

        if args.gallery is not None and not is_postgres_url(args.gallery):
            raise ArcdeployError(
                f"--gallery {args.gallery}: replicas on a Ray cluster share a gallery through PostgreSQL "
                "(postgresql://...); a folder gallery is for one server"
            )

        serve_on_ray(
            args.package,
            address=args.ray or None,
            replicas=args.replicas,
            detector=detector,
            settings=settings,
            threads=args.threads,
            host=args.host,
            port=args.port,
            on_listening=_announce,
            gallery=args.gallery,
        )
        return 0

    from ..serve.app import create_app, open_package
    from ..serve.server import serve

    pkg = open_package(args.package, threads=args.threads, engine_streams=settings.engine_streams)
    pkg.runtime  # noqa: B018 (a package that cannot load is refused here, with its reason, before serving)
    app = create_app(pkg, detector=detector, settings=settings, gallery=args.gallery)
    serve(app, host=args.host, port=args.port, on_listening=_announce, access_log=args.access_log)
    print("arcdeploy serve: stopped", file=sys.stderr)
    return 0


def _announce(host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    print(f"arcdeploy serve: listening on http://{shown}:{port} (GET /healthz: 200 once the model is warm)", flush=True)


def _open_detector(args):
    from types import SimpleNamespace

    from .embed import cli_detector

    return cli_detector(
        SimpleNamespace(
            landmarks=None,
            detector=args.detector,
            det_threshold=args.det_threshold,
            min_face=args.min_face,
            decode=args.decode,
        )
    )
