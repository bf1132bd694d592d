"""The --ray options shared by the commands that embed images (embed, eval ijb)."""

from __future__ import annotations

import sys


def add_ray_arguments(parser) -> None:
    g = parser.add_argument_group(
        "Ray cluster",
        "Decode, align and embed the images on a Ray cluster with Ray Data (needs "
        "pip install 'arcdeploy[ray]'). The output is the local run's, row for row, and is resumed "
        "the same way; the package reaches the workers through Ray's object store.",
    )
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: ADDRESS as Ray takes it (auto, HOST:PORT, ray://HOST:PORT); without one, "
        "RAY_ADDRESS when set, else a new local Ray on this machine",
    )
    g.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="embedding actors, each holding the package loaded (default: as many as the cluster's "
        "CPUs hold, --threads CPUs each)",
    )
    g.add_argument(
        "--ray-batch",
        type=int,
        default=None,
        metavar="N",
        help="images per block: what one actor is given at a time and the driver saves as one chunk "
        "for resuming (rounded up to whole --batch batches; default up to 256, fewer for small "
        "jobs so every actor gets work)",
    )
    g.add_argument(
        "--ray-read",
        choices=("driver", "workers"),
        default="driver",
        help="where image files are read: 'driver' (default: read where this command runs and sent "
        "as bytes, so no shared file system is needed) or 'workers' (every node sees the files "
        "under the same paths; spares this machine's disk and network)",
    )


def ray_options(args, threads: int | None = None, workers: int | None = None):
    """The RayOptions of parsed arguments, or None without --ray. Says what to install when Ray is missing."""
    if getattr(args, "ray", None) is None:
        for name in ("ray_actors", "ray_batch"):
            if getattr(args, name, None) is not None:
                from ..errors import ArcdeployError

                raise ArcdeployError(f"--{name.replace('_', '-')} needs --ray")
        return None
    from ..distributed import RayOptions, require_ray

    require_ray()
    return RayOptions(
        address=args.ray or None,
        actors=args.ray_actors,
        block=args.ray_batch,
        read=args.ray_read,
        threads=threads,
        workers=workers,
    )


def print_cluster_summary(res, out=sys.stdout) -> None:
    """What the cluster did: nodes seen, images each, throughput (nothing for a local run)."""
    if not getattr(res, "nodes", None):
        return
    restarted = f", {res.restarted_actors} restarted" if res.restarted_actors else ""
    print(
        f"ray: {len(res.nodes)} node(s), {res.actors} actor(s){restarted}: {res.computed} images in "
        f"{res.seconds:.1f} s, {res.steady_rate:.1f} images/s once running (first block after "
        f"{res.first_s:.1f} s: start-up)",
        file=out,
    )
    for n in res.nodes:
        share = 100.0 * n.images / res.computed if res.computed else 0.0
        print(
            f"  node {n.node_id[:12]} ({n.address}): {n.images} images ({share:.0f}%), {len(n.pids)} actor "
            f"process(es), {n.per_actor_rate:.1f} images/s per busy actor",
            file=out,
        )


def progress_lines(command: str, enabled: bool, every_s: float = 10.0):
    """Progress as a line on stderr every ``every_s`` seconds when stderr is no terminal (a cluster
    job's log); a terminal has the progress bar instead."""
    if not enabled or sys.stderr.isatty():
        return None
    last = [0.0]

    def show(p) -> None:
        if p.done < p.total and p.seconds - last[0] < every_s:
            return
        last[0] = p.seconds
        print(
            f"arcdeploy {command}: {p.done}/{p.total} images, {p.rate:.1f} images/s, {p.failed} failed",
            file=sys.stderr,
            flush=True,
        )

    return show
