"""Cross-request dynamic batching: the faces of concurrent requests share engine calls.

A request hands its aligned crops to :meth:`Batcher.embed` and awaits their rows. The batcher
keeps one queue of waiting crops (first come, first served) and ``engine_calls`` engine calls at
a time (default one): when the engine is free it takes up to ``max_batch`` waiting crops, waiting
at most ``max_wait_s`` after the oldest one arrived for more to come (and not at all when no
other request is on its way); while the engine works on one batch the next one gathers, so under
load every call is a full batch and no crop waits for a timer. Engine calls run in threads of
their own (OpenVINO and ONNX Runtime release the GIL), never on the event loop. ``max_batch=1``
turns batching off: every crop is its own engine call, in arrival order.

A request with more crops than ``max_batch`` (every face of a crowd) is cut into pieces of at
most ``max_batch``. A request that gave up (its timeout, a closed connection) leaves its crops
behind: they are dropped when their turn comes, and a result that arrives after is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ..errors import ArcdeployError

log = logging.getLogger(__name__)

ENGINE_THREAD = "arcdeploy-eng"


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the operating system too (Linux: at most 15 bytes), so
    ``top -H`` and /proc say which threads decode and which run the engine; threads it starts (an
    engine's workers) inherit the name."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None)
            libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


@dataclass
class _Piece:
    """Crops of one request waiting for the engine, and where their rows go."""

    crops: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


@dataclass
class BatchStats:
    """What one engine call did: its crops, how many requests' pieces it joined, its seconds."""

    size: int
    pieces: int
    seconds: float


class Batcher:
    """Gathers crops from concurrent callers into engine calls of up to ``max_batch`` crops.

    ``run``: aligned uint8 crops [n, 112, 112, 3] -> rows [n, ...] (called in an engine thread).
    ``on_batch``: told of every engine call (metrics). ``engine_calls``: engine calls in flight at
    once (1; more for an engine compiled with several streams, each call on its own stream).
    ``coming``: how many callers are on their way (their images being prepared); when none is, a
    batch does not wait for others that cannot come (a lone client pays no ``max_wait_s``), and
    :meth:`nudge` says that this number went down.
    Create and use it inside one event loop: :meth:`start` before the first :meth:`embed`,
    :meth:`close` to finish what is queued and stop.
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        max_batch: int,
        max_wait_s: float = 0.005,
        on_batch: Callable[[BatchStats], None] | None = None,
        engine_calls: int = 1,
        coming: Callable[[], int] | None = None,
    ):
        if int(max_batch) < 1:
            raise ArcdeployError(f"max batch must be at least 1, got {max_batch}")
        if not max_wait_s >= 0:
            raise ArcdeployError(f"max wait must be 0 or more seconds, got {max_wait_s}")
        self.run = run
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.on_batch = on_batch
        if int(engine_calls) < 1:
            raise ArcdeployError(f"engine calls in flight must be at least 1, got {engine_calls}")
        self.engine_calls = int(engine_calls)
        self.coming = coming
        self._pending: deque[_Piece] = deque()
        self._waiting = 0  # crops in _pending
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._engine = ThreadPoolExecutor(
            self.engine_calls, thread_name_prefix=ENGINE_THREAD, initializer=name_os_thread, initargs=(ENGINE_THREAD,)
        )

    @property
    def waiting(self) -> int:
        """Crops queued for the engine (not counting the batch it is running)."""
        return self._waiting

    async def in_engine_thread(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` in the engine's thread (warm-up: what the engine starts, it starts there)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine, fn)

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="arcdeploy-batcher")

    async def embed(self, crops: np.ndarray) -> np.ndarray:
        """The rows of ``crops`` [k, 112, 112, 3], computed with whatever else is waiting."""
        if self._task is None or self._wake is None:
            raise RuntimeError("Batcher.start() was not called")
        if self._closing:
            raise ArcdeployError("the server is shutting down")
        if self._task.done():
            raise ArcdeployError("the engine loop has stopped")
        loop = asyncio.get_running_loop()
        pieces = [
            _Piece(crops[s : s + self.max_batch], loop.create_future()) for s in range(0, len(crops), self.max_batch)
        ]
        for p in pieces:
            self._pending.append(p)
            self._waiting += len(p.crops)
        self._wake.set()
        try:
            rows = [await p.future for p in pieces]
        except BaseException:
            for p in pieces:  # the caller gave up: its crops are not run
                p.future.cancel()
            raise
        return rows[0] if len(rows) == 1 else np.concatenate(rows)

    def nudge(self) -> None:
        """Look again at what is waiting (a caller on its way will not come after all)."""
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        """Run every queued crop, then stop the loop and the engine thread."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        self._engine.shutdown(wait=True)

    # ---------------------------------------------------------------- the loop

    def _take(self) -> list[_Piece]:
        batch: list[_Piece] = []
        size = 0
        while self._pending:
            p = self._pending[0]
            if p.future.done():  # its request gave up
                self._pending.popleft()
                self._waiting -= len(p.crops)
                continue
            if size + len(p.crops) > self.max_batch:
                break
            self._pending.popleft()
            self._waiting -= len(p.crops)
            batch.append(p)
            size += len(p.crops)
        return batch

    async def _gather(self) -> None:
        """Wait (at most until the oldest waiting crop is ``max_wait_s`` old) for a full batch, as
        long as more crops may come."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while self._waiting < self.max_batch and not self._closing and self._pending:
            if self.coming is not None and self.coming() <= 0:
                return
            left = self._pending[0].arrived + self.max_wait_s - time.perf_counter()
            if left <= 0:
                return
            self._wake.clear()
            handle = loop.call_later(left, self._wake.set)
            try:
                await self._wake.wait()
            finally:
                handle.cancel()

    async def _loop(self) -> None:
        assert self._wake is not None
        slots = asyncio.Semaphore(self.engine_calls)
        running: set[asyncio.Task] = set()
        while True:
            if not self._pending:
                if self._closing:
                    break
                self._wake.clear()
                await self._wake.wait()
                continue
            # a free engine slot first: while every slot is busy, the next batch keeps gathering
            await slots.acquire()
            if self.max_batch > 1 and self.max_wait_s > 0:
                await self._gather()
            batch = self._take()
            if not batch:
                slots.release()
                continue
            task = asyncio.get_running_loop().create_task(self._run_batch(batch, slots))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)

    async def _run_batch(self, batch: list[_Piece], slots: asyncio.Semaphore) -> None:
        try:
            crops = batch[0].crops if len(batch) == 1 else np.concatenate([p.crops for p in batch])
            t0 = time.perf_counter()
            try:
                rows = await asyncio.get_running_loop().run_in_executor(self._engine, self.run, crops)
            except Exception as exc:  # the engine failed this batch: its requests hear why, the loop goes on
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                return
            seconds = time.perf_counter() - t0
            if self.on_batch is not None:
                self.on_batch(BatchStats(len(crops), len(batch), seconds))
            start = 0
            for p in batch:
                n = len(p.crops)
                if not p.future.done():
                    p.future.set_result(rows[start : start + n])
                start += n
        finally:
            slots.release()
