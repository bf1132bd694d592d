"""The embed pipeline on a Ray cluster, with Ray Data: the local run's rows, failures and files.

How the work travels
    The job is cut into blocks of ``B`` images (a whole number of inference batches): block ``c``
    is rows ``[c*B, (c+1)*B)`` and is exactly chunk ``c`` of the local run's
    :class:`~arcdeploy.faces.chunks.ChunkStore`, which lives on the driver beside the output. The
    dataset is one row per block not yet saved; ``map_batches`` gives each block, whole, to one
    actor of a pool. Each actor embeds it with :func:`~arcdeploy.faces.pipeline.embed_block`, the
    local run's own batch loop, cutting the same inference batches, so the rows are the ones the
    local run computes. The driver saves each block as a chunk when its result arrives (in any
    order) and assembles the output in row order at the end.

    The package goes through Ray's object store, not a shared file system: its manifest and the
    files its fingerprint covers are read on the driver into one object (``ray.put``). Each actor
    unpacks it into a private scratch folder, opens the package there, checks that the
    fingerprint is the one the driver recorded for the job, and keeps the engine loaded for the
    rest of its life. Other files the job needs (a detector) travel in the same object.

    Images, ``read="driver"`` (the default): a reader actor on the driver's node reads each
    block's files and passes their bytes on (:class:`~arcdeploy.faces.prepare.EncodedImage`), or
    why a file could not be read, worded as the local run words it; decoding and aligning happen
    on the embedding actors. No file system is shared and a path means what it means where the
    command runs (with Ray Client, ``ray://``, that is the head node, where Ray runs the driver).
    ``read="workers"``: the embedding actors read the paths themselves (every node must see the
    files under the same paths); the driver's disk and network then carry nothing.

Retries
    Ray Data's actor pool restarts an actor whose process dies (``max_restarts=-1``) and runs
    again the blocks it held (``max_task_retries=-1``); a block is only saved when its whole
    result has reached the driver, so a retried block is computed from scratch, with the same
    result. If the driver itself dies, the saved chunks stay; the same command continues after
    them (and, with the same block and batch sizes, so does a local run, and the reverse).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import pickle
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
from ray.util import get_node_ip_address

from ..errors import ArcdeployError, describe, first_line
from ..faces.chunks import ChunkStore
from ..faces.detectors.package import detector_files
from ..faces.io import max_pixels_limit, read_image_bytes
from ..faces.job import EmbedJob
from ..faces.pipeline import embed_block, progress_bar, quiet_opencv, refuse_outputs
from ..faces.prepare import Detection
from ..faces.types import EncodedImage, Failure, ImageError, input_name
from ..files import FileLock, scratch_dir
from ..machine import keep_freed_memory
from ..manifest import MANIFEST_NAME, resolve_inside
from ..package import Package, load
from . import NodeStats, Progress, RayEmbedResult, RayOptions

log = logging.getLogger(__name__)

MAX_BLOCK = 256  # images per block by default: small enough to spread and to redo cheaply after a failure
MIN_BLOCKS = 64  # a small job is still cut into about this many blocks, so every actor gets some
READERS_PER_ACTORS = 16  # one reader actor (driver mode) per this many embedding actors, at most MAX_READERS
MAX_READERS = 4
SCRATCH = "ray-package"


# ------------------------------------------------------------------ what travels


@dataclass(frozen=True)
class PackageBundle:
    """A package's files as bytes (one object in Ray's object store) and its fingerprint."""

    name: str  # the package folder on the driver (for messages)
    fingerprint: str
    files: dict[str, bytes]  # path inside the package -> content
    extras: dict[str, bytes]  # other files the job needs, by name (unpacked beside the package)

    @classmethod
    def of(cls, package: Package, extras: Mapping[str, str | os.PathLike] | None = None) -> PackageBundle:
        root = package.path
        source = str(root / MANIFEST_NAME)
        m = package.manifest
        names = sorted(set(m.files.values()) | ({m.reference.file} if m.reference else set()))
        fingerprint = package.fingerprint()
        files: dict[str, bytes] = {}
        try:
            files[MANIFEST_NAME] = (root / MANIFEST_NAME).read_bytes()
            for name in names:
                path = resolve_inside(root, name, source, "file")
                if path.is_file():  # as the fingerprint has it: a file it names but lacks is left out
                    files[name] = path.read_bytes()
            extra = {name: Path(p).read_bytes() for name, p in (extras or {}).items()}
        except OSError as exc:
            raise ArcdeployError(f"{exc.filename or root}: cannot read ({exc.strerror or exc})") from None
        return cls(str(root), fingerprint, files, extra)

    def unpack(self, folder: Path) -> tuple[Path, dict[str, Path]]:
        """Write the files below ``folder``; returns the package folder and the extras' paths."""

        def place(base: Path, name: str, data: bytes) -> Path:
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts:
                raise ArcdeployError(f"{self.name}: file name {name!r} leads outside the package; refused")
            target = base / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            return target

        pkg = folder / "package"
        for name, data in self.files.items():
            place(pkg, name, data)
        extras = {name: place(folder / "extras", name, data) for name, data in self.extras.items()}
        return pkg, extras


@dataclass(frozen=True)
class Blocks:
    """Everything an actor needs besides the package: the job (its detector named by the file
    that travels with the package) cut into blocks of ``block`` images."""

    job: EmbedJob
    block: int

    def bounds(self, c: int) -> tuple[int, int]:
        start = c * self.block
        return start, min(start + self.block, len(self.job.items))


def block_size(count: int, batch: int, requested: int | None = None) -> int:
    """Images per block: ``requested``, else up to :data:`MAX_BLOCK` and fewer for small jobs
    (about :data:`MIN_BLOCKS` blocks); a whole number of inference batches either way. It
    depends on the job alone, never on the cluster, so a rerun on other machines resumes."""
    if requested is None:
        requested = min(MAX_BLOCK, max(1, -(-count // MIN_BLOCKS)))
    return max(batch, -(-int(requested) // batch) * batch)


def _resolve(value):
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def _read_one(item, index: int):
    """One input of a block, read where the driver runs: its bytes or why they cannot be had."""
    if isinstance(item, np.ndarray):
        return item
    name = input_name(item, index)
    try:
        return EncodedImage(name, read_image_bytes(item))
    except ImageError as exc:
        return EncodedImage(name, None, exc.reason)
    except Exception as exc:  # worded as prepare_or_failure words a surprise in the local run
        return EncodedImage(name, None, f"{type(exc).__name__}: {first_line(exc)}")


# ------------------------------------------------------------------ the actors


class BlockReader:
    """Ray Data stage (driver mode): block numbers -> the block's images as bytes."""

    def __init__(self, blocks):
        self.blocks: Blocks = _resolve(blocks)

    def __call__(self, batch: dict) -> dict:
        items = self.blocks.job.items
        out = []
        for c in batch["block"]:
            start, end = self.blocks.bounds(int(c))
            out.append(pickle.dumps([_read_one(items[i], i) for i in range(start, end)], protocol=5))
        return {"block": np.asarray(batch["block"]), "images": np.array(out, dtype=object)}


class BlockEmbedder:
    """Ray Data stage: block numbers (and, in driver mode, their images) -> rows and failures.

    The package is unpacked and opened once, when the actor starts; the unpacked copy is removed
    as soon as the engine holds the model (it reads its files when it opens them, and a file it
    maps stays readable after removal), so an actor that is killed later leaves nothing on disk.
    A failure to open it is kept and raised with the first block: Ray passes a task's error on
    as it is, where an actor that fails to start is only retried and then reported as a dead actor.
    """

    def __init__(self, bundle, blocks, threads: int):
        self.error: ArcdeployError | None = None
        self.pid = os.getpid()
        ctx = ray.get_runtime_context()
        self.node = ctx.get_node_id()
        self.address = get_node_ip_address()
        scratch = contextlib.ExitStack()
        name, pkg_dir = "the package", None
        try:
            quiet_opencv()
            keep_freed_memory()
            self.blocks: Blocks = _resolve(blocks)
            bundle = _resolve(bundle)
            name = bundle.name
            folder = scratch.enter_context(scratch_dir(SCRATCH))
            pkg_dir, _ = bundle.unpack(folder)
            self.package = load(pkg_dir, threads=threads)
            self.detection = None
            spec = self.blocks.job.detector_spec()
            if spec is not None:  # it travelled under its own name, so failures name it as here
                self.detection = Detection(spec.with_path(folder / "extras" / spec.path.name).open())
            got = self.package.fingerprint()
            if got != bundle.fingerprint:
                raise ArcdeployError(
                    f"{name}: the package arrived changed on node {self.address} (fingerprint "
                    f"{got[:12]}, expected {bundle.fingerprint[:12]}); was it rebuilt while the "
                    "job started?"
                )
            self.package.runtime  # noqa: B018 (opens the engine once, for every block)
        except Exception as exc:
            # named as the user knows it, not by this actor's scratch copy
            text = describe(exc).replace(str(pkg_dir), name) if pkg_dir else describe(exc)
            where = f"on node {self.address}"
            self.error = ArcdeployError(
                f"{text} ({where})" if isinstance(exc, ArcdeployError) else f"{name}: cannot be opened {where} ({text})"
            )
        finally:
            scratch.close()

    def __call__(self, batch: dict) -> dict:
        if self.error is not None:
            raise self.error
        images = batch.get("images")
        out = []
        for k, c in enumerate(batch["block"]):
            c = int(c)
            start, end = self.blocks.bounds(c)
            items = None if images is None else dict(zip(range(start, end), pickle.loads(images[k])))
            t0 = time.perf_counter()
            rows, failures = embed_block(self.package, self.blocks.job, start, end, self.detection, items)
            busy = time.perf_counter() - t0
            out.append(pickle.dumps((c, rows, failures, self.node, self.address, self.pid, busy), protocol=5))
        return {"result": np.array(out, dtype=object)}


# ------------------------------------------------------------------ Ray plumbing


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _pool(size: int):
    """A pool of up to ``size`` actors, started at once; it runs with fewer when the cluster has
    room for fewer (instead of waiting for all of them)."""
    kw: dict = {"min_size": 1, "max_size": size}
    if _accepts(ray.data.ActorPoolStrategy, "initial_size"):
        kw["initial_size"] = size
    if _accepts(ray.data.ActorPoolStrategy, "max_tasks_in_flight_per_actor"):
        kw["max_tasks_in_flight_per_actor"] = 2  # one block running, the next one's input arriving
    return ray.data.ActorPoolStrategy(**kw)


def _client_mode() -> bool:
    with contextlib.suppress(Exception):
        from ray.util.client import ray as client

        return bool(client.is_connected())
    return False


def _driver_node() -> str:
    """The node the driver's files are on: this process's node; with Ray Client, the head node
    (Ray runs the client's driver there)."""
    if not _client_mode():
        return ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("Alive") and any(k.startswith("node:__internal_head__") for k in node.get("Resources", {})):
            return node["NodeID"]
    raise ArcdeployError("cannot find the Ray head node to read the images on; use --ray-read workers")


def _pinned_to(node_id: str) -> dict:
    """map_batches arguments that keep a stage's actors on one node: by the node's label where this
    Ray has node labels (remote arguments such as a scheduling strategy are on their way out of
    map_batches), else by a node-affinity scheduling strategy."""
    labelled = any(
        n.get("NodeID") == node_id and (n.get("Labels") or {}).get("ray.io/node-id") == node_id for n in ray.nodes()
    )
    if labelled and _accepts(ray.data.Dataset.map_batches, "label_selector"):
        return {"label_selector": {"ray.io/node-id": node_id}}
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}


def _refuse_what_cannot_be_placed(threads: int) -> None:
    """An actor reserves ``threads`` CPUs on one node; when no node has that many, Ray would wait
    for one forever ("resources are not enough"): say so before any actor starts."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    largest = max((float(n.get("Resources", {}).get("CPU", 0)) for n in alive), default=0.0)
    if threads > largest:
        raise ArcdeployError(
            f"--threads {threads}: each Ray actor reserves that many CPUs on one node, and the largest of "
            f"the cluster's {len(alive)} node(s) has {largest:g}; use --threads {max(1, int(largest))} or fewer"
        )


def _cluster_cpus() -> int:
    return int(ray.cluster_resources().get("CPU", 0))


@contextlib.contextmanager
def ray_session(address: str | None, connect_timeout: float | None = None):
    """Connected to Ray for the duration: to ``address`` (``auto``, ``HOST:PORT``, ``ray://...``);
    without one to ``RAY_ADDRESS`` when set, else to a new local Ray. A connection made here is
    closed here; one the caller made is used as it is.

    Reaching a cluster is bounded: nothing listening at ``HOST:PORT`` is said at once, a peer
    that does not answer as Ray does within ``connect_timeout`` seconds (default
    :data:`CONNECT_TIMEOUT_S`, ``ARCDEPLOY_RAY_CONNECT_TIMEOUT``) is given up. A loopback address
    stays loopback (Ray would otherwise swap it for this machine's network address), and a local
    Ray started here keeps its files in a private folder removed afterwards."""
    if ray.is_initialized():
        yield
        return
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    timeout = connect_timeout if connect_timeout is not None else _connect_timeout()
    kwargs: dict = {"address": target, "logging_level": logging.WARNING, "log_to_driver": False}
    where = "a local Ray" if target == "local" else f"the Ray cluster at {target}"
    session = contextlib.ExitStack()  # what lives as long as the connection
    try:
        with contextlib.ExitStack() as starting:
            if target == "local":
                kwargs["include_dashboard"] = False
                starting.enter_context(_loopback_only())
                if not os.environ.get("RAY_TMPDIR"):
                    kwargs["_temp_dir"] = str(session.enter_context(scratch_dir("ray", _short_temp_base())))
            elif _is_loopback(target):
                starting.enter_context(_loopback_only())
            if target not in ("local", "auto") and not target.startswith("ray://"):
                _probe(target, timeout)
            with _deadline(timeout, where):
                ray.init(**kwargs)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever a failed start left running
        session.close()
        if isinstance(exc, (ArcdeployError, KeyboardInterrupt, SystemExit)):
            raise
        raise ArcdeployError(f"cannot start or reach {where} ({describe(exc)})") from None
    try:
        yield
    finally:
        ray.shutdown()
        session.close()  # the local Ray's private folder, once its processes are gone


CONNECT_TIMEOUT_S = 30.0
# Ray puts unix sockets at <temp dir>/session_<date>_<pid>/sockets/plasma_store (62 characters
# below the temp dir), and a socket path may have at most 107 bytes
MAX_RAY_TEMP_DIR = 107 - 62 - len("/arcdeploy-ray-4194304-12345678")


def _short_temp_base() -> str:
    """The temp folder, or /tmp when the temp folder's path is too long for Ray's sockets."""
    base = tempfile.gettempdir()
    return base if len(base) <= MAX_RAY_TEMP_DIR or not os.path.isdir("/tmp") else "/tmp"


def _connect_timeout() -> float:
    raw = os.environ.get("ARCDEPLOY_RAY_CONNECT_TIMEOUT", "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ArcdeployError(f"ARCDEPLOY_RAY_CONNECT_TIMEOUT={raw!r}: not a number of seconds") from None
    if not value > 0:
        raise ArcdeployError(f"ARCDEPLOY_RAY_CONNECT_TIMEOUT must be above 0 seconds, got {raw}")
    return value


def _host_port(address: str) -> tuple[str, int] | None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _is_loopback(address: str) -> bool:
    import ipaddress

    found = _host_port(address.removeprefix("ray://"))
    if found is None:
        return False
    host = found[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _probe(address: str, timeout: float) -> None:
    """A one-line error at once when nothing listens at ``HOST:PORT`` (Ray would retry for minutes)."""
    import socket

    found = _host_port(address)
    if found is None:
        raise ArcdeployError(f"--ray {address}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection(found, timeout=min(timeout, 10.0)):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ArcdeployError(f"cannot reach the Ray cluster at {address} ({reason}); is Ray running there?") from None


@contextlib.contextmanager
def _deadline(seconds: float, where: str):
    """Give up what runs inside after ``seconds`` (main thread only: a timer signal interrupts
    Ray's connection retries, which sleep in Python between tries). Ray's own retry count is
    bounded the same way."""
    import signal
    import threading

    saved_wait = os.environ.get("RAY_gcs_server_port_wait_time_s")
    if saved_wait is None:  # Ray tries about once a second this many times
        os.environ["RAY_gcs_server_port_wait_time_s"] = str(max(1, int(seconds)))
    main = threading.current_thread() is threading.main_thread()

    def expired(signum, frame):
        raise ArcdeployError(f"cannot reach {where}: no answer within {seconds:g} s (ARCDEPLOY_RAY_CONNECT_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expired) if main else None
    if main:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if saved_wait is None:
            os.environ.pop("RAY_gcs_server_port_wait_time_s", None)


@contextlib.contextmanager
def _loopback_only():
    """While a Ray for this job alone starts: every one of its processes on 127.0.0.1, so it
    opens no port to the network. Ray does so when RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which it
    reads when imported (this process: its constant) and when its processes start (their
    environment); a value the user set is kept."""
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        yield
        return
    constants: Any = None
    with contextlib.suppress(Exception):
        constants = importlib.import_module("ray._private.ray_constants")
    saved = getattr(constants, "ENABLE_RAY_CLUSTER", None)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if saved is not None:
        constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
        if saved is not None:
            constants.ENABLE_RAY_CLUSTER = saved


@contextlib.contextmanager
def _quiet_ray_data():
    """Ray Data's own progress bars and execution notes off (the driver shows its own progress)."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "verbose_stats_logs") if hasattr(ctx, k)}
    loggers = {name: logging.getLogger(name) for name in ("ray.data", "ray.data._internal.progress")}
    levels = {name: lg.level for name, lg in loggers.items()}
    ctx.enable_progress_bars = False
    loggers["ray.data"].setLevel(logging.WARNING)
    loggers["ray.data._internal.progress"].setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deprecated.*")
            yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


_ARCDEPLOY_LINE = re.compile(r"ArcdeployError: (.+)$", re.M)


def _job_error(exc: BaseException) -> ArcdeployError:
    """A failed Ray job as one line: the actors' own error when there is one."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, ArcdeployError) and type(cause) is ArcdeployError:
            return cause
        if type(e) is ArcdeployError:
            return e
        todo += [x for x in (e.__cause__, e.__context__, cause) if isinstance(x, BaseException)]
    found = _ARCDEPLOY_LINE.findall(str(exc))
    if found:
        return ArcdeployError(found[-1].strip())
    return ArcdeployError(f"the Ray job failed ({describe(exc)})")


# ------------------------------------------------------------------ the driver


class _Collector:
    """The driver's side: results of blocks in, chunks saved, progress and per-node counts out."""

    def __init__(
        self,
        bounds,
        row_shape,
        store: ChunkStore | None,
        done: dict[int, list[Failure]],
        total: int,
        resumed: int,
        progress: bool,
        on_failure,
        on_progress,
    ):
        self.bounds, self.row_shape, self.store, self.done = bounds, row_shape, store, done
        self.rows: dict[int, np.ndarray] = {}
        self.nodes: dict[str, NodeStats] = {}
        self.total, self.resumed, self.on_failure, self.on_progress = total, resumed, on_failure, on_progress
        self.finished = resumed
        self.failed = sum(len(f) for f in done.values())
        self.computed = 0
        self.first: tuple[float, int] | None = None  # (seconds, images) when the first block arrived
        self.t0 = time.perf_counter()
        self.actors = 0  # the size of the actor pool, once it started
        self.bar = progress_bar(total, resumed, progress, desc="embed (ray)")

    def add(self, result: bytes) -> None:
        c, rows, failures, node, address, pid, busy = pickle.loads(result)
        start, end = self.bounds[c]
        if rows.dtype != np.float32 or rows.shape != (end - start, *self.row_shape):
            raise ArcdeployError(
                f"block {c} came back with rows {list(rows.shape)} {rows.dtype}, expected "
                f"{[end - start, *self.row_shape]} float32 (engine output of another shape?)"
            )
        if c in self.done:  # Ray ran a block twice (a retry that raced its first result): same rows
            return
        if self.store is not None:
            self.store.save(c, rows, failures)
        else:
            self.rows[c] = rows
        self.done[c] = failures
        stats = self.nodes.setdefault(node, NodeStats(node, address))
        stats.images += end - start
        stats.blocks += 1
        stats.busy_s += busy
        stats.pids.add(pid)
        self.finished += end - start
        self.computed += end - start
        if self.first is None:
            self.first = (self.elapsed, end - start)
        for f in failures:
            self.failed += 1
            if self.on_failure:
                self.on_failure(f)
        self.bar.update(end - start)
        if failures:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        if self.on_progress:
            self.on_progress(Progress(self.finished, self.total, self.failed, self.elapsed, self.computed))

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def close(self) -> None:
        self.bar.close()

    def result(self, features, failures: list[Failure], **kw) -> RayEmbedResult:
        nodes = sorted(self.nodes.values(), key=lambda s: -s.images)
        first_s, first_images = self.first or (0.0, 0)
        return RayEmbedResult(
            features,
            failures,
            resumed_rows=self.resumed,
            nodes=nodes,
            actors=self.actors,
            seconds=self.elapsed,
            computed=self.computed,
            first_s=first_s,
            first_images=first_images,
            **kw,
        )


def _run_blocks(
    bundle: Callable[[], PackageBundle],
    blocks: Blocks,
    todo: list[int],
    options: RayOptions,
    collect: Callable[[bytes], None],
) -> int:
    """Run the missing blocks on the cluster; each result goes to ``collect`` as it arrives.
    ``bundle`` makes the package's bundle (held only until the object store has it). Returns
    the size of the actor pool."""
    threads = int(options.threads or 1)
    with _quiet_ray_data():
        _refuse_what_cannot_be_placed(threads)
        cpus = _cluster_cpus()
        actors = int(options.actors or max(1, cpus // threads))
        actors = max(1, min(actors, len(todo)))
        log.info(
            "Ray: %d CPUs, %d embedding actors of %d CPUs, %d blocks of %d images, images read on the %s",
            cpus,
            actors,
            threads,
            len(todo),
            blocks.block,
            options.read,
        )
        bundle_ref = ray.put(bundle())
        blocks_ref = ray.put(blocks)
        rows = [{"block": c} for c in todo]
        ds: ray.data.Dataset
        if _accepts(ray.data.from_items, "override_num_blocks"):
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        else:
            ds = ray.data.from_items(rows, parallelism=len(rows))
        if options.read == "driver":
            readers = max(1, min(MAX_READERS, -(-actors // READERS_PER_ACTORS)))
            # reading files costs no CPU worth reserving; the CPUs are the embedding actors'
            ds = ds.map_batches(
                BlockReader,
                fn_constructor_args=(blocks_ref,),
                batch_size=1,
                batch_format="numpy",
                compute=_pool(readers),
                num_cpus=0,
                **_pinned_to(_driver_node()),
            )
        ds = ds.map_batches(
            BlockEmbedder,
            fn_constructor_args=(bundle_ref, blocks_ref, threads),
            batch_size=1,
            batch_format="numpy",
            compute=_pool(actors),
            num_cpus=threads,
        )
        try:
            for row in ds.iter_rows():
                collect(row["result"])
        except (ArcdeployError, KeyboardInterrupt):
            raise
        except Exception as exc:
            raise _job_error(exc) from None
    return actors


def _for_the_cluster(job: EmbedJob, package, options: RayOptions) -> tuple[EmbedJob, dict[str, Path]]:
    """The job as the actors get it, and the files that travel with the package: its detector
    named by its file (under its own name, so failures name it as a local run does), the
    pixel limit settled here (``ARCDEPLOY_MAX_PIXELS`` is this machine's setting, not the
    workers'), the decoding threads per actor, no output (the driver writes it)."""
    if job.all_faces:
        raise ArcdeployError("--all-faces is not available with --ray (one row per image only)")
    spec = job.detector_spec()
    extras: dict[str, Path] = {}
    if spec is not None:  # a detector file, or a detector package's files under its folder's name
        extras.update(detector_files(spec.path))
        spec = spec.with_path(spec.path.name)
    threads = int(options.threads or 1)
    sent = replace(
        job,
        detector=spec,
        batch=job.batch_for(package),
        workers=int(options.workers or job.workers or threads + 1),
        max_pixels=max_pixels_limit(job.max_pixels),
        output=None,
    )
    return sent, extras


def run_on_ray(
    job: EmbedJob,
    package,
    options: RayOptions | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    on_progress: Callable[[Progress], None] | None = None,
) -> RayEmbedResult:
    """Run ``job`` on a Ray cluster (module doc): the local run's rows, failures, output files
    and resuming. ``options.block`` (else ``job.chunk_rows``) is the block size."""
    options = options or RayOptions()
    pkg = load(package)
    if job.output is not None:  # before anything starts: the images may take hours
        refuse_outputs(job.output, job.force, job.all_faces)
    sent, extras = _for_the_cluster(job, pkg, options)
    n = len(job.items)
    block = block_size(n, int(sent.batch or 1), options.block or job.chunk_rows)
    blocks = Blocks(sent, block)
    bounds = [blocks.bounds(c) for c in range(-(-n // block))]
    row_shape = job.row_shape(pkg)

    def compute(store: ChunkStore | None, done: dict[int, list[Failure]]) -> _Collector:
        resumed = sum(bounds[c][1] - bounds[c][0] for c in done)
        for c in sorted(done):
            for f in done[c]:
                if on_failure:
                    on_failure(f)
        todo = [c for c in range(len(bounds)) if c not in done]
        collector = _Collector(bounds, row_shape, store, done, n, resumed, job.progress, on_failure, on_progress)
        try:
            if todo:
                with ray_session(options.address):
                    collector.actors = _run_blocks(
                        lambda: PackageBundle.of(pkg, extras), blocks, todo, options, collector.add
                    )
        finally:
            collector.close()
        missing = [c for c in todo if c not in done]
        if missing:
            raise ArcdeployError(
                f"the Ray job ended with {len(missing)} blocks missing (first: rows "
                f"{bounds[missing[0]][0]}-{bounds[missing[0]][1] - 1}); run it again to finish"
            )
        return collector

    if job.output is None:
        done: dict[int, list[Failure]] = {}
        collector = compute(None, done)
        failures = [f for c in range(len(bounds)) for f in done[c]]
        parts = [collector.rows[c] for c in range(len(bounds))]
        features = np.concatenate(parts) if parts else np.empty((0, *row_shape), np.float32)
        return collector.result(features, failures)

    output = job.output
    with FileLock(output):
        # the detector's identity is the local run's: saved chunks resume either way
        detection = None if sent.detector is None else Detection(job.detector_spec().open())  # type: ignore[union-attr]
        store = ChunkStore.open(output, job.identity(pkg, int(sent.batch or 1), block, detection), job.resume)
        done = {}
        for c, (s, e) in enumerate(bounds):
            loaded = store.load(c, e - s)
            if loaded is not None and tuple(loaded.features.shape[1:]) == row_shape:
                done[c] = loaded.failures
        collector = compute(store, done)
        failures = [f for c in range(len(bounds)) for f in done[c]]
        fpath = store.assemble(output, bounds, row_shape, failures, force=job.force)
        store.remove()
    return collector.result(np.load(output, mmap_mode="r"), failures, output=output, failures_path=fpath)
