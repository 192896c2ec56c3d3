"""Online evaluation: replay a split's users through a live endpoint and measure its answers.

Each user is sent to `/recommend` with the history offline evaluation used (every item before
the held-out one, newest first, the newest `MAX_HISTORY` of them), the business rules off and
k = the largest K. The held-out item's place in the answer is its rank; absent, a miss. The
metrics then come from the one metrics module, so the online and offline numbers of the same
export can be read side by side (jobs/replay.py).
"""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
from tqdm import tqdm

from shoprank.serving.schemas import MAX_HISTORY

MISS = np.iinfo(np.int64).max // 2  # a rank beyond every K


async def _replay(
    url: str, key: str, histories: list[list[str]], targets: list[str], k: int, concurrency: int
) -> tuple[np.ndarray, dict[str, int]]:
    ranks = np.full(len(targets), MISS, dtype=np.int64)
    latency_ms = np.zeros(len(targets))
    answered: dict[str, int] = {}
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(targets), desc="replay", unit="user")
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=120, headers={"x-api-key": key}, limits=limits) as client:

        async def one(u: int) -> None:
            body = {"history": histories[u][:MAX_HISTORY], "k": k, "rules": False}
            async with gate:
                started = time.perf_counter()
                reply = await client.post(f"{url}/recommend", json=body)
                latency_ms[u] = (time.perf_counter() - started) * 1000
            reply.raise_for_status()
            got = reply.json()
            stage = got.get("stage_one") or got.get("fallback") or "?"
            answered[stage] = answered.get(stage, 0) + 1
            ids = [i["item_id"] for i in got["items"]]
            if targets[u] in ids:
                ranks[u] = ids.index(targets[u])
            bar.update()

        await asyncio.gather(*(one(u) for u in range(len(targets))))
    bar.close()
    answered["p50_ms"] = round(float(np.percentile(latency_ms, 50)), 1)
    answered["p99_ms"] = round(float(np.percentile(latency_ms, 99)), 1)
    return ranks, answered


def replay(
    url: str,
    key: str,
    histories: list[list[str]],
    targets: list[str],
    k: int,
    concurrency: int = 8,
) -> tuple[np.ndarray, dict[str, int]]:
    """The rank of each target in the endpoint's answer (MISS when not among its k), and how
    many answers each stage one gave with the requests' latency percentiles (e.g.
    {"blend": 8442, "p50_ms": 41.2, "p99_ms": 88.0})."""
    return asyncio.run(_replay(url.rstrip("/"), key, histories, targets, k, concurrency))
