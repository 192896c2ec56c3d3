"""The model replicas' batcher: no wait when idle, batches as large as the backlog under load,
one pass at a time, errors to every request of their pass."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from shoprank.serving.coalesce import Coalescer


class SlowModel:
    """Doubles numbers; each pass takes `seconds` and records its size and overlap."""

    def __init__(self, seconds: float = 0.05):
        self.seconds, self.sizes, self.running, self.overlapped = seconds, [], 0, False
        self.lock = threading.Lock()

    def __call__(self, requests: list) -> list:
        with self.lock:
            self.running += 1
            self.overlapped |= self.running > 1
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        self.sizes.append(len(requests))
        if any(r == "bad" for r in requests):
            raise ValueError("a bad request in the pass")
        return [2 * r for r in requests]


def test_a_lone_request_starts_a_pass_at_once():
    model = SlowModel(0.0)

    async def go():
        batcher = Coalescer(model, ThreadPoolExecutor(1))
        started = time.perf_counter()
        assert await batcher(21) == 42
        return time.perf_counter() - started

    assert asyncio.run(go()) < 0.5
    assert model.sizes == [1]


def test_requests_queued_during_a_pass_form_the_next_one():
    model = SlowModel(0.05)
    observed = []

    async def go():
        # an executor of 4 threads: only the batcher keeps passes from overlapping
        batcher = Coalescer(model, ThreadPoolExecutor(4), max_size=8, observe=observed.append)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.sleep(0.01)  # its pass is running
        return await asyncio.gather(first, *(batcher(i) for i in range(1, 20)))

    assert asyncio.run(go()) == [2 * i for i in range(20)]
    # the first request starts alone; the other 19 queue behind it, in passes of at most 8
    assert model.sizes == [1, 8, 8, 3]
    assert [len(r) for r in observed] == model.sizes
    assert not model.overlapped


def test_max_size_one_is_one_request_a_pass():
    model = SlowModel(0.01)

    async def go():
        batcher = Coalescer(model, ThreadPoolExecutor(1))
        batcher.configure(1, 0.0)
        return await asyncio.gather(*(batcher(i) for i in range(5)))

    assert asyncio.run(go()) == [0, 2, 4, 6, 8]
    assert model.sizes == [1] * 5


def test_an_error_reaches_every_request_of_its_pass_and_only_those():
    model = SlowModel(0.05)

    async def go():
        batcher = Coalescer(model, ThreadPoolExecutor(1))
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.01)  # the first pass is running: the next three queue together
        rest = [asyncio.ensure_future(batcher(r)) for r in (2, "bad", 3)]
        got = await asyncio.gather(first, *rest, return_exceptions=True)
        after = await batcher(5)  # the batcher still serves
        return got, after

    got, after = asyncio.run(go())
    assert got[0] == 2
    assert all(isinstance(g, ValueError) for g in got[1:])
    assert after == 10


def test_a_cancelled_request_leaves_its_pass_and_the_rest_answered():
    model = SlowModel(0.05)

    async def go():
        batcher = Coalescer(model, ThreadPoolExecutor(1))
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher(2))
        kept = asyncio.ensure_future(batcher(3))
        await asyncio.sleep(0)
        gone.cancel()
        return await first, await kept

    assert asyncio.run(go()) == (2, 6)
    assert model.sizes == [1, 1]  # the cancelled request never reached the model


def test_a_wait_gathers_requests_that_arrive_soon_after():
    model = SlowModel(0.0)

    async def go():
        batcher = Coalescer(model, ThreadPoolExecutor(1), wait_s=0.03)
        first = asyncio.ensure_future(batcher(1))
        await asyncio.sleep(0.005)
        return await asyncio.gather(first, batcher(2))

    assert asyncio.run(go()) == [2, 4]
    assert model.sizes == [2]
