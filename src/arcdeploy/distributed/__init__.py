"""Embedding on a Ray cluster: the same output as the local run, computed on many machines.

Ray is optional (``pip install 'arcdeploy[ray]'``); only this package imports it, and only
when a distributed run is asked for, so everything else works without it. The options and
result types below import nothing from Ray; the work is in :mod:`arcdeploy.distributed.ray`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import ArcdeployError
from ..faces.job import EmbedJob
from ..faces.pipeline import EmbedResult
from ..faces.types import Failure

__all__ = [
    "DEFAULT_READ",
    "INSTALL_HINT",
    "READ_MODES",
    "NodeStats",
    "Progress",
    "RayEmbedResult",
    "RayOptions",
    "embed_files_on_ray",
    "ray_available",
    "require_ray",
    "run_on_ray",
]

INSTALL_HINT = "pip install 'arcdeploy[ray]'"
# "driver": image files are read where the command runs and sent to the workers as bytes, so
# no file system needs to be shared and a path means what it means locally; "workers": each
# worker reads the paths itself (a file system mounted at the same path on every node), which
# spares the driver's disk and network when the images are many
READ_MODES = ("driver", "workers")
DEFAULT_READ = "driver"


@dataclass(frozen=True)
class RayOptions:
    """Where and how a job runs on Ray.

    ``address``: as ``ray.init`` takes it (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None or
    "": ``RAY_ADDRESS`` when set, else a new local Ray on this machine. ``actors``: embedding actors
    (default: as many as the cluster's CPUs hold, at ``threads`` CPUs each). ``block``: images per
    block, the unit an actor is given and the driver saves as one chunk (default: up to 256,
    fewer for small jobs so every actor gets work; rounded up to whole inference batches).
    ``read``: "driver" or "workers" (see ``READ_MODES``). ``threads``: engine threads per actor,
    also the CPUs each actor reserves (default 1). ``workers``: decoding threads per actor
    (default: ``threads`` + 1).
    """

    address: str | None = None
    actors: int | None = None
    block: int | None = None
    read: str = DEFAULT_READ
    threads: int | None = None
    workers: int | None = None

    def __post_init__(self) -> None:
        if self.read not in READ_MODES:
            raise ArcdeployError(f"--ray-read must be one of {', '.join(READ_MODES)}, not {self.read!r}")
        for name in ("actors", "block", "threads", "workers"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ArcdeployError(f"Ray option {name} must be at least 1, got {value}")


@dataclass
class NodeStats:
    """What one node of the cluster did: images embedded, by how many actor processes, and the
    seconds those processes spent on them (decoding, aligning and inference)."""

    node_id: str
    address: str
    images: int = 0
    blocks: int = 0
    busy_s: float = 0.0
    pids: set[int] = field(default_factory=set)

    @property
    def per_actor_rate(self) -> float:
        """Images per second of one busy actor on this node."""
        return self.images / self.busy_s if self.busy_s > 0 else 0.0


@dataclass
class Progress:
    """Where a running job stands (given to ``on_progress`` after each block)."""

    done: int
    total: int
    failed: int
    seconds: float
    computed: int  # images computed in this run (``done`` also counts resumed ones)

    @property
    def rate(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RayEmbedResult(EmbedResult):
    """:class:`EmbedResult` plus what the cluster did."""

    nodes: list[NodeStats] = field(default_factory=list)
    actors: int = 0
    seconds: float = 0.0  # from the start of the job on the cluster to its last block
    computed: int = 0  # images computed in this run (not resumed)
    first_s: float = 0.0  # when the first block arrived: connecting, starting actors, loading the package
    first_images: int = 0  # images in that first block

    @property
    def steady_rate(self) -> float:
        """Images per second once the actors were running (from the first block's arrival on)."""
        span = self.seconds - self.first_s
        return (self.computed - self.first_images) / span if span > 0 else 0.0

    @property
    def restarted_actors(self) -> int:
        """Actor processes beyond the pool's size: replacements of actors that died."""
        return max(0, sum(len(n.pids) for n in self.nodes) - self.actors)


def ray_available() -> bool:
    try:
        importlib.import_module("ray.data")
    except ImportError:
        return False
    return True


def require_ray() -> None:
    """Raise a one-line :class:`ArcdeployError` saying what to install when Ray Data is missing."""
    if not ray_available():
        raise ArcdeployError(f"--ray needs Ray with Ray Data, which is not installed: {INSTALL_HINT}")


def run_on_ray(
    job: EmbedJob,
    package,
    options: RayOptions | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RayEmbedResult:
    """:func:`arcdeploy.faces.pipeline.run_local` on a Ray cluster: the same job gives the same
    rows, failures, output files and resuming. ``options.block`` (else ``job.chunk_rows``) is the
    block size; ``options.workers`` (else ``job.workers``) the decoding threads per actor. A
    detector's file travels with the package (one row per image). See
    :mod:`arcdeploy.distributed.ray` for how the work travels."""
    require_ray()
    from .ray import run_on_ray as run

    return run(job, package, options, on_failure=on_failure, on_progress=on_progress)


def embed_files_on_ray(
    package,
    paths: Sequence,
    ray: RayOptions | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    **settings,
) -> RayEmbedResult:
    """:func:`arcdeploy.faces.pipeline.embed_files` on a Ray cluster: :func:`run_on_ray` of
    ``EmbedJob.create(paths, **settings)``."""
    return run_on_ray(EmbedJob.create(paths, **settings), package, ray, on_failure, on_progress)
