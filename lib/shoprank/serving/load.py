"""Closed-loop load on a running app, and the timeline of what Serve did meanwhile: what the
autoscaling test (tests/test_autoscale.py) and bench (bench/bench_autoscale.py) drive.

Each client loops: `/recommend` for a user, then `POST /feedback` (a click on one item of that
answer), recording every request's start, latency, status and the replica that answered
(`X-Shoprank-Replica`). `set_clients(n)` changes how many loop at once, so a run can climb,
hold and fall while the poller records Serve's replicas.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import numpy as np

from shoprank.serving.frontend import REPLICA_HEADER


@dataclass
class Sample:
    t: float  # seconds since the load started, at the request's start
    ms: float
    route: str  # "recommend" or "feedback"
    status: int  # HTTP status; 0: no answer (connection error, timeout)
    replica: str | None
    request_id: str | None = None  # the answer's (feedback: the answer it was about)
    items: int = 0  # items in the answer


@dataclass
class ClosedLoop:
    """Up to `max_clients` clients against `url`, `set_clients(n)` of them active."""

    url: str
    key: str
    users: list[str]
    max_clients: int = 16
    k: int = 10
    timeout_s: float = 60.0
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # what failed without an HTTP status

    def __post_init__(self) -> None:
        self._clients = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.started = time.perf_counter()

    def set_clients(self, n: int) -> None:
        self._clients = max(0, min(n, self.max_clients))

    def start(self, clients: int) -> ClosedLoop:
        self.set_clients(clients)
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 10)

    def _record(self, sample: Sample) -> None:
        with self._lock:
            self.samples.append(sample)

    async def _post(self, http: httpx.AsyncClient, route: str, body: dict) -> dict | None:
        """The answer's JSON (empty for a non-2xx), None when no answer came; recorded."""
        t0 = time.perf_counter()
        try:
            r = await http.post(f"{self.url}/{route}", json=body)
        except httpx.HTTPError as err:
            self.errors.append(f"{route}: {type(err).__name__}: {err}")
            self._record(Sample(t0 - self.started, 0.0, route, 0, None))
            return None
        ms = (time.perf_counter() - t0) * 1000
        got = r.json() if r.status_code < 300 else {}
        rid = got.get("request_id") or body.get("request_id")
        replica = r.headers.get(REPLICA_HEADER)
        items = len(got.get("items", []))
        self._record(Sample(t0 - self.started, ms, route, r.status_code, replica, rid, items))
        return got

    async def _client(self, http: httpx.AsyncClient, i: int) -> None:
        rng = np.random.default_rng(i)
        while not self._stop.is_set():
            if i >= self._clients:
                await asyncio.sleep(0.05)
                continue
            user = self.users[int(rng.integers(len(self.users)))]
            answer = await self._post(http, "recommend", {"user_id": user, "k": self.k})
            if not answer or not answer["items"]:
                continue
            item = answer["items"][int(rng.integers(len(answer["items"])))]["item_id"]
            body = {"request_id": answer["request_id"], "item_id": item, "event": "click"}
            await self._post(http, "feedback", body)

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=self.max_clients)
        headers = {"x-api-key": self.key}
        async with httpx.AsyncClient(
            timeout=self.timeout_s, limits=limits, headers=headers
        ) as http:
            await asyncio.gather(*(self._client(http, i) for i in range(self.max_clients)))


def free_port() -> int:
    """A TCP port nobody listens on, for an app under load."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running_replicas(app: str, deployment: str) -> int:
    """Replicas of a deployment Serve reports RUNNING."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    if deployment not in deployments:
        raise KeyError(f"{app} has no deployment {deployment}: it has {sorted(deployments)}")
    return int(deployments[deployment].replica_states.get("RUNNING", 0))


def watch(
    app: str,
    deployment: str,
    until: Callable[[list[tuple[float, int]]], bool],
    timeout_s: float,
    since: float | None = None,
) -> list[tuple[float, int]]:
    """(time, running replicas) every 0.25 s until `until(timeline)` holds; raises on timeout.
    Times count from `since` (a `time.perf_counter()`, e.g. the load's start) or from now."""
    called = time.perf_counter()
    since = called if since is None else since
    timeline: list[tuple[float, int]] = []
    while True:
        timeline.append((time.perf_counter() - since, running_replicas(app, deployment)))
        if until(timeline):
            return timeline
        if time.perf_counter() - called > timeout_s:
            raise TimeoutError(
                f"{deployment}: not reached in {timeout_s:.0f} s; replicas seen: "
                f"{sorted({n for _, n in timeline})}"
            )
        time.sleep(0.25)


def windows(samples: list[Sample], width_s: float = 2.0) -> list[dict]:
    """Per time window: requests/s (answers), p50 and p99 ms of /recommend, failures."""
    rec = [s for s in samples if s.route == "recommend"]
    if not rec:
        return []
    end = max(s.t for s in rec)
    out = []
    for start in np.arange(0.0, end + width_s, width_s):
        got = [s for s in rec if start <= s.t < start + width_s]
        ok = [s.ms for s in got if s.status == 200]
        out.append(
            {
                "t": float(start),
                "rps": len(ok) / width_s,
                "p50_ms": float(np.percentile(ok, 50)) if ok else None,
                "p99_ms": float(np.percentile(ok, 99)) if ok else None,
                "failed": sum(s.status != 200 for s in got),
            }
        )
    return out


def scale_cycle(
    load: ClosedLoop,
    app: str,
    deployment: str,
    high: int,
    low: int,
    replicas: int,
    hold_s: float = 4.0,
    timeout_s: float = 180.0,
) -> dict:
    """Drive a started `load` through one autoscaling cycle: `high` clients until `replicas`
    run, held `hold_s` seconds, then `low` clients until one runs, `hold_s` more. Returns the
    replica timeline and when each phase began and ended (seconds on the load's clock)."""
    marks = {"load_up": time.perf_counter() - load.started}
    load.set_clients(high)
    since = load.started
    up = watch(app, deployment, lambda tl: tl[-1][1] >= replicas, timeout_s, since)
    marks["scaled_up"] = up[-1][0]
    hold = watch(app, deployment, lambda tl: tl[-1][0] - tl[0][0] >= hold_s, timeout_s, since)
    load.set_clients(low)
    marks["load_down"] = hold[-1][0]
    down = watch(app, deployment, lambda tl: tl[-1][1] == 1, timeout_s, since)
    marks["scaled_down"] = down[-1][0]
    after = watch(app, deployment, lambda tl: tl[-1][0] - tl[0][0] >= hold_s, timeout_s, since)
    return {"timeline": up + hold + down + after, "marks": marks}
