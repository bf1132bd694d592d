"""The batcher on its own: faces of concurrent callers in shared engine calls, each caller's rows
its own, limits kept, failures and callers that give up handled. The "engine" is a real
function of the crops (their per-image pixel sums and a fingerprint of the batch it ran in)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from arcdeploy.errors import ArcdeployError

pytest.importorskip("fastapi", reason="serving needs pip install 'arcdeploy[serve]'")

from arcdeploy.serve.batcher import Batcher, BatchStats


def crops(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def expected(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).sum(axis=1, dtype=np.int64)[:, None].astype(np.float64)


class Engine:
    """Sums each crop's pixels; sleeps a little so callers pile up while it works; records batches."""

    def __init__(self, seconds: float = 0.02, fail_on: int | None = None):
        self.seconds = seconds
        self.fail_on = fail_on
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(x))
            self.threads.add(threading.current_thread().name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        if self.fail_on is not None and len(x) == self.fail_on:
            raise ArcdeployError(f"engine refused a batch of {len(x)}")
        return expected(x)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_share_engine_calls_and_get_their_own_rows():
    engine = Engine()
    stats: list[BatchStats] = []

    async def main():
        b = Batcher(engine, max_batch=8, max_wait_s=0.01, on_batch=stats.append)
        b.start()
        inputs = [crops(k % 3 + 1, seed=k) for k in range(40)]  # 1 to 3 faces each
        outs = await asyncio.gather(*(b.embed(x) for x in inputs))
        await b.close()
        return inputs, outs

    inputs, outs = run(main())
    for x, y in zip(inputs, outs):
        np.testing.assert_array_equal(y, expected(x))
    assert sum(engine.sizes) == sum(len(x) for x in inputs)
    assert max(engine.sizes) <= 8 and max(engine.sizes) > 3  # several callers per call
    assert len(engine.sizes) < len(inputs)
    assert engine.threads == {t for t in engine.threads if t.startswith("arcdeploy-eng")}
    assert [s.size for s in stats] == engine.sizes and all(s.pieces >= 1 for s in stats)


def test_a_caller_with_more_faces_than_a_batch_is_cut_into_batches():
    engine = Engine(seconds=0)

    async def main():
        b = Batcher(engine, max_batch=4, max_wait_s=0.0)
        b.start()
        x = crops(11, seed=1)
        y = await b.embed(x)
        await b.close()
        return x, y

    x, y = run(main())
    np.testing.assert_array_equal(y, expected(x))
    assert engine.sizes == [4, 4, 3]


def test_max_batch_1_runs_every_face_alone_in_arrival_order():
    engine = Engine(seconds=0.005)

    async def main():
        b = Batcher(engine, max_batch=1, max_wait_s=0.05)
        b.start()
        outs = await asyncio.gather(*(b.embed(crops(2, seed=k)) for k in range(5)))
        await b.close()
        return outs

    outs = run(main())
    assert engine.sizes == [1] * 10
    for k, y in enumerate(outs):
        np.testing.assert_array_equal(y, expected(crops(2, seed=k)))


def test_an_engine_failure_reaches_the_callers_of_that_batch_and_the_loop_goes_on():
    engine = Engine(seconds=0.01, fail_on=3)

    async def main():
        b = Batcher(engine, max_batch=3, max_wait_s=0.0)
        b.start()
        failed = await asyncio.gather(b.embed(crops(3, seed=0)), return_exceptions=True)
        ok = await b.embed(crops(2, seed=1))
        await b.close()
        return failed, ok

    failed, ok = run(main())
    assert isinstance(failed[0], ArcdeployError) and "batch of 3" in str(failed[0])
    np.testing.assert_array_equal(ok, expected(crops(2, seed=1)))


def test_a_caller_that_gives_up_leaves_no_work_behind():
    engine = Engine(seconds=0.1)

    async def main():
        b = Batcher(engine, max_batch=2, max_wait_s=0.0)
        b.start()
        first = asyncio.ensure_future(b.embed(crops(2, seed=0)))  # occupies the engine
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await b.embed(crops(2, seed=1))  # waits behind it, then gives up
        assert b.waiting == 2  # still queued, cancelled
        await first
        await b.close()
        return b.waiting

    assert run(main()) == 0
    assert engine.sizes == [2]  # the abandoned crops never reached the engine


def test_close_runs_what_is_queued_and_then_refuses():
    engine = Engine(seconds=0.02)

    async def main():
        b = Batcher(engine, max_batch=4, max_wait_s=0.0)
        b.start()
        pending = [asyncio.ensure_future(b.embed(crops(3, seed=k))) for k in range(5)]
        await asyncio.sleep(0)
        await b.close()
        outs = [p.result() for p in pending]
        with pytest.raises(ArcdeployError, match="shutting down"):
            await b.embed(crops(1, seed=9))
        return outs

    outs = run(main())
    for k, y in enumerate(outs):
        np.testing.assert_array_equal(y, expected(crops(3, seed=k)))


def test_several_engine_calls_in_flight():
    engine = Engine(seconds=0.05)

    async def main():
        b = Batcher(engine, max_batch=2, max_wait_s=0.0, engine_calls=3)
        b.start()
        outs = await asyncio.gather(*(b.embed(crops(2, seed=k)) for k in range(6)))
        await b.close()
        return outs

    outs = run(main())
    for k, y in enumerate(outs):
        np.testing.assert_array_equal(y, expected(crops(2, seed=k)))
    assert engine.most_at_once >= 2 and len(engine.threads) >= 2  # side by side, in separate engine threads
    assert engine.most_at_once <= 3


@pytest.mark.parametrize("kwargs", [{"max_batch": 0}, {"max_batch": 2, "max_wait_s": -1}, {"engine_calls": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ArcdeployError):
        Batcher(expected, **{"max_batch": 2, **kwargs})
