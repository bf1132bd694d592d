"""The service on a Ray cluster with Ray Serve (``arcdeploy serve PKG --ray [ADDRESS] [--replicas N]``).

Each replica runs the very application :func:`arcdeploy.serve.create_app` builds (FastAPI
ingress; its own batcher and worker pool), so its answers are the local server's. The package
travels as ``embed --ray`` sends it: its files read here into one
:class:`~arcdeploy.distributed.ray.PackageBundle` put in Ray's object store (no shared file
system), with the detector file beside it; each replica unpacks it into a private scratch folder,
opens it, checks its fingerprint against the one recorded here, and removes the copy once the
engine and the detector hold what they need. Replicas reserve ``threads`` CPUs each and are
spread over the nodes (at most ``ceil(replicas / nodes)`` per node); HTTP comes in through one
Ray Serve proxy on the head node, on ``host``:``port``. A replica is ready once its model is
warm. Ray Serve bounds the requests it queues for the replicas (503 beyond) as the local
server's queue does.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import ray
from ray import serve

from ..errors import ArcdeployError, describe
from ..files import scratch_dir
from ..package import Package, load
from .adapter import default_batch, detector_files, detector_spec

if TYPE_CHECKING:
    from ..faces.detectors import DetectorSpec
from .app import ServeSettings, create_app, open_package

log = logging.getLogger(__name__)

APP_NAME = "arcdeploy"
SCRATCH = "serve-package"


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica is given: the bundle (in a list, so Ray passes the reference as it is), the
    detector's settings and the service's."""

    bundle: list
    detector: DetectorSpec | None
    settings: ServeSettings
    threads: int | None
    gallery: str | None = None  # a PostgreSQL gallery every replica searches


# set by the replica's constructor and read right after by Ray Serve's call of _replica_app, in the
# replica's own process (one replica per process)
_SPEC: list[ReplicaSpec] = []


class _Replica:
    def __init__(self, spec: ReplicaSpec):
        _SPEC[:] = [spec]


def _replica_app():
    """Builds the replica's application: the package unpacked from the object store and opened."""
    from ..distributed.ray import PackageBundle

    spec = _SPEC[0]
    bundle: PackageBundle = ray.get(spec.bundle[0])
    with scratch_dir(SCRATCH) as folder:
        pkg_dir, _ = bundle.unpack(folder)
        pkg = open_package(pkg_dir, threads=spec.threads, engine_streams=spec.settings.engine_streams)
        got = pkg.fingerprint()
        if got != bundle.fingerprint:
            raise ArcdeployError(
                f"{bundle.name}: the package arrived changed (fingerprint {got[:12]}, expected "
                f"{bundle.fingerprint[:12]}); was it rebuilt while the service started?"
            )
        try:
            pkg.runtime  # noqa: B018 (the engine reads its files now, before the copy goes)
        except ArcdeployError as exc:
            raise ArcdeployError(describe(exc).replace(str(pkg_dir), bundle.name)) from None
        detector = None
        if spec.detector is not None:  # the file travelled under its own name, so failures name it as here
            detector = spec.detector.with_path(folder / "extras" / spec.detector.path.name).open()
    node = ray.get_runtime_context().get_node_id()
    # startup warm-up: Ray Serve routes to a replica once its application has started
    return create_app(
        pkg,
        gallery=spec.gallery,
        detector=detector,
        settings=replace(spec.settings, warm_up="startup"),
        instance=f"ray node {node[:12]} pid {os.getpid()}",
    )


def _alive_nodes() -> int:
    return max(1, sum(1 for n in ray.nodes() if n.get("Alive")))


def _wait_for_stop() -> None:
    """Until SIGTERM or SIGINT (main thread), or forever elsewhere."""
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass


def serve_on_ray(
    package: str | os.PathLike | Package,
    address: str | None = None,
    replicas: int | None = None,
    detector=None,
    settings: ServeSettings | None = None,
    threads: int | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    on_listening: Callable[[str, int], None] | None = None,
    until: Callable[[], None] = _wait_for_stop,
    gallery: str | None = None,
) -> None:
    """Deploy the service on Ray Serve, announce it, wait (``until``: by default for SIGTERM or
    SIGINT), then take it down and return.

    ``address``: as ``ray.init`` takes it; None: ``RAY_ADDRESS``, else a new local Ray.
    ``replicas``: default one per alive node. ``threads``: engine threads and CPUs per replica
    (default 1). ``port`` 0: a free port of this machine (the proxy runs on the head node: with
    a remote cluster, give the port).
    """
    from ..distributed.ray import PackageBundle, ray_session

    settings = settings or ServeSettings()
    pkg = load(package)
    found = detector_spec(detector)
    extras: dict[str, str | os.PathLike] = {}
    shipped = None
    if found is not None:  # the file travels with the package, under its own name (what failures name)
        extras.update(detector_files(found.path))  # a file, or a detector package's files
        shipped = found.with_path(found.path.name)
    if replicas is not None and int(replicas) < 1:
        raise ArcdeployError(f"--replicas must be at least 1, got {replicas}")
    if port == 0:
        port = _free_port(host)
    cpus = int(threads or 1)
    with ray_session(address):
        bundle = PackageBundle.of(pkg, extras)
        ref = ray.put(bundle)
        count = int(replicas or _alive_nodes())
        spec = ReplicaSpec([ref], shipped, settings, cpus, gallery)
        # requests a replica holds at once: enough to fill two batches; the rest wait in Ray Serve's
        # router (bounded by max_queue) and go to whichever replica frees up, on any node
        ongoing = min(settings.max_queue, 2 * int(settings.max_batch or default_batch(pkg)))
        options: dict = {
            "name": APP_NAME,
            "num_replicas": count,
            "ray_actor_options": {"num_cpus": cpus},
            "max_ongoing_requests": ongoing,
            "max_queued_requests": settings.max_queue,
        }
        if count > 1:
            options["max_replicas_per_node"] = math.ceil(count / _alive_nodes())
        deployment = serve.deployment(**options)(serve.ingress(_replica_app)(_Replica))
        try:
            serve.start(
                proxy_location="HeadOnly",
                http_options={"host": host, "port": port, "request_timeout_s": settings.timeout_s + 5},
            )
            t0 = time.perf_counter()
            serve.run(deployment.bind(spec), name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as exc:
            with contextlib.suppress(Exception):
                serve.shutdown()
            raise ArcdeployError(f"Ray Serve could not start the service ({describe(exc)})") from None
        log.info("%d replica(s) ready in %.1f s", count, time.perf_counter() - t0)
        try:
            if on_listening is not None:
                on_listening(host, port)
            until()
        finally:
            # replicas finish the requests they hold before they stop (Ray Serve's graceful shutdown)
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME)
            with contextlib.suppress(Exception):
                serve.shutdown()


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
