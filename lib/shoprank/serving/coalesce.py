"""Requests that arrive while a forward pass runs go into the next pass together.

A model replica runs one pass at a time on its torch thread. When it is idle a request starts
a pass at once (no wait at concurrency 1); under load each pass takes every request that
queued during the last one (up to `max_size`), so batches grow with the backlog. Serve's
`@serve.batch` forms its next batch as soon as it hands the last one off, so with passes off
the event loop and a wait of 0 it gathered 1.0-1.6 requests a batch at concurrency 16
(RESULTS.md, "BLAS threads").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any


class Coalescer:
    """`await coalescer(request)` -> `fn([..., request, ...])`'s answer for it, `fn` run on
    `executor`; `observe(requests)` is called on the event loop after each pass."""

    def __init__(
        self,
        fn: Callable[[list], list],
        executor: Executor,
        max_size: int = 32,
        wait_s: float = 0.0,
        observe: Callable[[list], None] | None = None,
    ):
        self.fn, self.executor, self.observe = fn, executor, observe
        self.max_size, self.wait_s = max_size, wait_s
        self.pending: list[tuple[Any, asyncio.Future]] = []
        self.draining = False

    def configure(self, max_size: int, wait_s: float) -> None:
        """`max_size` 1: one request a pass (no batching); `wait_s`: how long a pass that is
        not full waits for more before it starts."""
        self.max_size, self.wait_s = max_size, wait_s

    async def __call__(self, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self.pending.append((request, answer))
        if not self.draining:
            self.draining = True
            loop.create_task(self.drain())
        return await answer

    async def drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self.pending:
                if self.wait_s > 0 and len(self.pending) < self.max_size:
                    await asyncio.sleep(self.wait_s)
                batch = self.pending[: self.max_size]
                del self.pending[: self.max_size]
                batch = [(r, a) for r, a in batch if not a.done()]  # cancelled meanwhile
                if not batch:
                    continue
                requests = [r for r, _ in batch]
                try:
                    out = await loop.run_in_executor(self.executor, self.fn, requests)
                except Exception as error:  # every request of the pass gets the error
                    for _, answer in batch:
                        if not answer.done():
                            answer.set_exception(error)
                    continue
                for (_, answer), got in zip(batch, out, strict=True):
                    if not answer.done():
                        answer.set_result(got)
                if self.observe is not None:
                    self.observe(requests)
        finally:
            self.draining = False
