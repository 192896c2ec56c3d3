"""The HTTP API: authentication, limits, feature store, retrieve -> rerank -> rules, and the
log of what was served and what came of it (serving/impressions.py, `/feedback`).

`api` holds the routes; the object serving them is `install`ed in this module. In the Serve app
the Ingress deployment puts a `Frontend` there whose backends are the Retriever and Ranker
deployments; the benchmark's plain baseline puts one whose backends are the same services
called in-process. Either way the same code validates, authenticates and ranks.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response, Security
from fastapi.security import APIKeyHeader

from shoprank.console import redact
from shoprank.retrieval.rerank import mixed
from shoprank.serving import schemas
from shoprank.serving.auth import HEADER, ApiKeys, hash_user
from shoprank.serving.features import ParquetFeatureStore
from shoprank.serving.gate import guard
from shoprank.serving.impressions import ImpressionLogger, new_request_id
from shoprank.serving.rules import Filters, RuleEngine, Rules, RulesFile
from shoprank.serving.services import read_catalog

log = logging.getLogger("ray.serve")
FILTER_OVERFETCH = 10  # /search with filters retrieves this many times retrieve_top


@dataclass
class Backends:
    """How the frontend reaches the models (Serve handles, or in-process services)."""

    retrieve: Callable[..., Awaitable[dict]]  # (history, query, extra, n)
    score: Callable[..., Awaitable[dict]] | None  # (history, context, extra, item_ids)
    versions: Callable[[], Awaitable[dict[str, int | None]]]
    describe: Callable[[], Awaitable[dict]]  # the retriever's stage one, in words


REPLICA_HEADER = "X-Shoprank-Replica"


class _Metrics:
    """Prometheus metrics through Ray (exported with Serve's own); absent outside Ray."""

    def __init__(self):
        from ray.util import metrics

        self.requests = metrics.Counter(
            "shoprank_requests",
            description="Requests by endpoint and HTTP status.",
            tag_keys=("endpoint", "status"),
        )
        self.latency = metrics.Histogram(
            "shoprank_request_latency_ms",
            description="Time to answer, by endpoint.",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000],
            tag_keys=("endpoint",),
        )
        self.version = metrics.Gauge(
            "shoprank_model_version",
            description="Registry version serving, by model.",
            tag_keys=("model",),
        )
        self.event_log = metrics.Counter(
            "shoprank_event_log",
            description="Served-events log: rows written, dropped (buffer full), lost (failed "
            "writes), feedback outcomes...",
            tag_keys=("what",),
        )

    def count(self, what: str, n: int) -> None:
        self.event_log.inc(n, tags={"what": what})


class Frontend:
    def __init__(self, args: schemas.AppArgs, backends: Backends, with_metrics: bool = True):
        self.args, self.backends = args, backends
        self.keys = ApiKeys.load(args.api_keys_file)  # none configured: fail at startup
        self.catalog = read_catalog(args.catalog)
        names = self.catalog.column_names
        n = self.catalog.num_rows
        self.rows = {item: i for i, item in enumerate(self.catalog["item_id"].to_pylist())}
        self.titles = self.catalog["title"].to_pylist()
        self.columns = {
            c: self.catalog[c].to_pylist() if c in names else [None] * n
            for c in ("category", "brand", "price")
        }
        stock = self.catalog["in_stock"].to_pylist() if "in_stock" in names else [True] * n
        self.columns["in_stock"] = [s is not False for s in stock]  # unknown = in stock
        self.rules = RulesFile(args.rules, self.catalog)
        no_filters = Filters(out_of_stock=False, already_purchased=False)
        self.no_rules = RuleEngine(Rules(filters=no_filters), self.catalog)  # rules: false
        self.features = ParquetFeatureStore(
            args.events, self.catalog["item_id"], refresh_s=args.refresh_s
        )
        self.metrics = _Metrics() if with_metrics else None
        self.explore = np.random.default_rng()  # which answers explore, and their order
        self.impressions = None
        if args.impressions_dir:
            self.impressions = ImpressionLogger(
                args.impressions_dir,
                user_ids=args.log_user_ids,
                flush_s=args.impressions_flush_s,
                flush_rows=args.impressions_flush_rows,
                max_rows=args.impressions_buffer_rows,
                on_count=self.metrics.count if self.metrics else None,
            )
        # A random name for this replica (nothing about the host): which one answered, in the
        # answers' REPLICA_HEADER, for load tests and debugging across replicas.
        self.replica = uuid.uuid4().hex[:8]
        log.info(
            f"shoprank frontend up (replica {self.replica}): {len(self.keys)} API keys, "
            f"{n} catalog items"
        )

    def close(self) -> None:
        """Write the served-events log's buffer (shutdown: best effort, counted)."""
        if self.impressions is not None:
            self.impressions.close()

    def served(
        self,
        request_id: str,
        user_id: str | None,
        query: str | None,
        items: list[schemas.Item],
        versions: dict[str, int | None],
        explored: bool = False,
    ) -> None:
        if self.impressions is not None:
            ids = [i.item_id for i in items]
            self.impressions.served(request_id, user_id, query, ids, versions, explored=explored)

    def explores(self, own_order: bool) -> bool:
        """Whether this answer explores: with probability `explore_share`, never when the
        caller asks for the model's own order (explain=true, rules=false: replay, parity)."""
        share = self.args.explore_share
        return bool(share) and not own_order and self.explore.random() < share

    def depth(self, k: int, explore: bool) -> int:
        """How many ranked items an answer needs: k, or the head an exploration draws from."""
        return max(k, self.args.explore_top or k) if explore else k

    def shuffled(self, items: list[schemas.Item], k: int) -> list[schemas.Item]:
        """An exploration answer: k items drawn at random from the ranked head, in random
        order; every item of the head is as likely to be shown, at any position."""
        return [items[i] for i in self.explore.permutation(len(items))[:k]]

    def observe(self, endpoint: str, status: int, started: float) -> None:
        if self.metrics:
            self.metrics.requests.inc(tags={"endpoint": endpoint, "status": str(status)})
            ms = (time.perf_counter() - started) * 1000
            self.metrics.latency.observe(ms, tags={"endpoint": endpoint})

    async def versions(self) -> dict[str, int | None]:
        versions = await self.backends.versions()
        if self.metrics:
            for model, v in versions.items():
                if v is not None:
                    self.metrics.version.set(v, tags={"model": model})
        return versions

    async def rank(
        self,
        ids: list[str],
        scores: list[float],
        k: int,
        explain: bool,
        history: list[str] | None = None,
        context: str | None = None,
        extra: str | None = None,
        decision: dict | None = None,
        rerank: bool = True,
        rules: bool = True,
        timings: dict[str, float] | None = None,
    ) -> tuple[list[schemas.Item], dict[str, int] | None]:
        """Stage two on the first candidates as the retriever's `decision` (its rerank.json)
        says: (1 - mix) z(stage one) + mix z(ranker), the head kept ahead; then the rules."""
        final = np.asarray(scores, dtype=np.float32)
        tier = None
        top, mix = self.stage_two(decision) if rerank else (0, 0.0)
        top = min(top, len(ids))
        if top:
            started = time.perf_counter()
            got = await self.backends.score(history, context, extra, ids[:top])
            if timings is not None:
                timings["rank"] = (time.perf_counter() - started) * 1000
            # The decision was measured with one ranker: another one's scores are not used
            # (unless the app's rerank_top forces the ranker).
            forced = self.args.rerank_top is not None
            if forced or decision is None or got["weights"] == decision["ranker_weights"]:
                # (ids come from the catalog, so the ranker knows every one of them)
                head = mixed(final[:top], np.array(got["scores"], np.float32), mix)
                final = np.concatenate([head.astype(np.float32), final[top:]])
                tier = np.arange(len(ids)) >= top  # the reranked head first, then the rest
        rows = np.array([self.rows[i] for i in ids], dtype=np.int64)
        seen = np.array([self.rows[i] for i in history or [] if i in self.rows], dtype=np.int64)
        before_rules = dict(zip(rows.tolist(), final.tolist(), strict=True)) if explain else {}
        engine = self.rules.current() if rules else self.no_rules
        ranked = engine.apply(rows, final, k, history=seen, explain=explain, tier=tier)
        items = [
            schemas.Item(
                item_id=engine.ids[r],
                score=float(s),
                title=self.titles[r],
                why=ranked.changes.get(int(r)) if explain else None,
                model_score=before_rules[int(r)] if explain else None,
            )
            for r, s in zip(ranked.rows, ranked.scores, strict=True)
        ]
        return items, (ranked.removed if explain else None)

    def stage_two(self, decision: dict | None) -> tuple[int, float]:
        """(how many candidates the ranker rescores, its mix weight): the registry's record
        (rerank.json) unless the app's `rerank_top` forces one (then the ranker's order)."""
        if self.backends.score is None:
            return 0, 0.0
        if self.args.rerank_top is not None:
            return self.args.rerank_top, 1.0
        if decision is None or decision["two_stage"] <= decision["stage_one"]:
            return 0, 0.0
        return decision["rerank_top"], decision["mix"]

    async def recommend(
        self, body: schemas.RecommendRequest, timings: dict[str, float] | None = None
    ) -> schemas.RankedResponse:
        """`timings`, when given, gets each stage's milliseconds (the Server-Timing header)."""
        history = body.history
        if history is None:
            history = self.features.history(body.user_id)
        history = [i for i in history or [] if i in self.rows]
        explore = self.explores(body.explain or not body.rules)
        depth = self.depth(body.k, explore)
        fallback = None
        if history:
            started = time.perf_counter()
            got = await self.backends.retrieve(history, None, body.context, self.args.retrieve_top)
            if timings is not None:
                timings["retrieve"] = (time.perf_counter() - started) * 1000
            items, removed = await self.rank(
                got["item_ids"],
                got["scores"],
                depth,
                body.explain,
                history,
                None,
                body.context,
                got["rerank"],
                rules=body.rules,
                timings=timings,
            )
        else:  # an unknown user, or no known item: the most popular items, flagged as such
            fallback = "popular"
            ids = [i for i in self.features.popular(self.args.retrieve_top) if i in self.rows]
            scores = np.linspace(1.0, 0.0, num=len(ids)).tolist()
            items, removed = await self.rank(
                ids, scores, depth, body.explain, rerank=False, rules=body.rules
            )
        who = hash_user(body.user_id) if body.user_id else "explicit history"
        log.info(f"recommend for {who}: {len(items)} items, fallback={fallback}")
        if explore:
            items = self.shuffled(items, body.k)
        request_id, versions = new_request_id(), await self.versions()
        self.served(request_id, body.user_id, None, items, versions, explore)
        return schemas.RankedResponse(
            items=items,
            fallback=fallback,
            removed=removed,
            version=versions,
            stage_one=None if fallback else got["stage_one"],
            request_id=request_id,
            explored=explore,
        )

    async def search(
        self, body: schemas.SearchRequest, timings: dict[str, float] | None = None
    ) -> schemas.RankedResponse:
        f, col = body.filters, self.columns
        explore = self.explores(body.explain or not body.rules)
        # Filters drop candidates after retrieval: fetch more so that k usually survive.
        n = self.args.retrieve_top * (FILTER_OVERFETCH if f.model_dump(exclude_none=True) else 1)
        started = time.perf_counter()
        got = await self.backends.retrieve(None, body.query, None, n)
        if timings is not None:
            timings["retrieve"] = (time.perf_counter() - started) * 1000
        ids, scores = [], []
        for item, score in zip(got["item_ids"], got["scores"], strict=True):
            r = self.rows[item]
            if (
                (f.category and not (col["category"][r] or "").startswith(f.category))
                or (f.brand and col["brand"][r] != f.brand)
                or (f.max_price is not None and (col["price"][r] or 0) > f.max_price)
                or (f.in_stock is not None and col["in_stock"][r] is not f.in_stock)
            ):
                continue
            ids.append(item)
            scores.append(score)
        items, removed = await self.rank(
            ids,
            scores,
            self.depth(body.k, explore),
            body.explain,
            context=body.query,
            decision=got["rerank"],
            rules=body.rules,
            timings=timings,
        )
        if explore:
            items = self.shuffled(items, body.k)
        request_id, versions = new_request_id(), await self.versions()
        self.served(request_id, body.user_id, body.query, items, versions, explore)
        return schemas.RankedResponse(
            items=items,
            removed=removed,
            version=versions,
            stage_one=got["stage_one"],
            request_id=request_id,
            explored=explore,
        )

    def feedback(self, body: schemas.FeedbackRequest) -> schemas.FeedbackResponse:
        if self.impressions is None:
            raise HTTPException(
                404, "feedback is not logged by this app: set impressions_dir in the app's args"
            )
        outcome = self.impressions.feedback(body.request_id, body.item_id, body.event)
        logged = outcome == "logged"
        return schemas.FeedbackResponse(logged=logged, reason=None if logged else outcome)

    async def score(self, body: schemas.ScoreRequest) -> schemas.ScoreResponse:
        if self.backends.score is None:
            raise HTTPException(404, "no ranker is deployed: set `ranker` in the app's args")
        got = await self.backends.score(None, body.context, None, body.item_ids)
        return schemas.ScoreResponse(
            scores=got["scores"], unknown_items=got["unknown"], version=await self.versions()
        )


def stage_two_words(models: dict, args: schemas.AppArgs) -> dict:
    """What /version says about the two stages (the retriever's stage one and its rerank
    record, or why the ranker is not used) and the precision each model computes in."""
    retriever, ranker_weights = models["retriever"], models["ranker_weights"]
    recorded = retriever.get("rerank_weights")
    if ranker_weights is None:
        second = "no ranker deployed: stage one's order goes to the rules"
    elif args.rerank_top is not None:
        second = (
            f"forced by the app's rerank_top={args.rerank_top}: the ranker's order on the "
            "first candidates, whatever rerank.json records"
        )
    elif recorded is not None and recorded != ranker_weights:
        second = "no rerank: rerank.json was measured with another ranker than the one served"
    else:
        second = retriever["rerank"]
    return {
        "stage_one": retriever["stage_one"],
        "stage_two": second,
        "precision": models["precision"],
    }


# -- routes ------------------------------------------------------------------------------------


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """At shutdown (uvicorn's, or a Serve replica's), write the served-events log's buffer."""
    yield
    front = installed()
    if front is not None:
        front.close()


api = FastAPI(
    title="shoprank",
    description="Product recommendation and search: retrieve -> rerank -> business rules. "
    f"Send an API key in the `{HEADER}` header.",
    version="1",
    lifespan=_lifespan,
)


_serving: list[Frontend] = []  # the process's frontend (one per Serve replica or plain app)


def install(front: Frontend) -> None:
    """Make `front` the one the routes use. (Not `api.state`: Serve runs a copy of `api`.)"""
    _serving[:] = [front]


def installed() -> Frontend | None:
    return _serving[0] if _serving else None


# Key, limits, strict JSON and metrics are checked in gate.py, before FastAPI reads a body.
guard(api, installed, schemas.MAX_BODY_BYTES)


def frontend(request: Request) -> Frontend:
    front = installed()
    if front is None:
        raise HTTPException(503, "the app is starting: no frontend installed yet")
    return front


# The gate checks the key; this declares it in the OpenAPI schema (clients and the fuzz suite
# read it there).
KEY = [Security(APIKeyHeader(name=HEADER, auto_error=False))]


@api.get("/healthz")
async def healthz(request: Request) -> dict:
    """Open (no key): says whether the app is fine, never why not (that is behind the key,
    in /version)."""
    front = frontend(request)
    if front.rules.error is not None:
        return {"status": "degraded", "rules": "the last good rules are in force"}
    return {"status": "ok"}


@api.get("/version", dependencies=KEY)
async def version(request: Request) -> dict:
    front = frontend(request)
    return {
        "models": await front.versions(),
        **await front.backends.describe(),
        "names": {"retriever": front.args.retriever, "ranker": front.args.ranker},
        "alias": front.args.alias,
        "replica": front.replica,
        "registry": redact(front.args.registry),
        "features": front.features.info(),
        "rules_error": front.rules.error,
        # The served-events log's counts (rows written, dropped, lost; feedback outcomes), or
        # None when impressions_dir is not set.
        "impressions": front.impressions.info() if front.impressions else None,
        # Answers shown in a random order, drawn from the ranked list's first explore_top.
        "explore": {"share": front.args.explore_share, "top": front.args.explore_top},
    }


def server_timing(response: Response, timings: dict[str, float]) -> None:
    """Each stage's milliseconds in the standard Server-Timing header (`retrieve;dur=12.3,
    rank;dur=80.1`): what a client or the serving benchmark reads to see where time goes;
    and which replica answered (`REPLICA_HEADER`)."""
    front = installed()
    if front is not None:
        response.headers[REPLICA_HEADER] = front.replica
    if timings:
        response.headers["Server-Timing"] = ", ".join(
            f"{stage};dur={ms:.1f}" for stage, ms in timings.items()
        )


@api.post("/recommend", response_model=schemas.RankedResponse, dependencies=KEY)
async def recommend(body: schemas.RecommendRequest, request: Request, response: Response):
    timings: dict[str, float] = {}
    out = await frontend(request).recommend(body, timings)
    server_timing(response, timings)
    return out


@api.post("/search", response_model=schemas.RankedResponse, dependencies=KEY)
async def search(body: schemas.SearchRequest, request: Request, response: Response):
    timings: dict[str, float] = {}
    out = await frontend(request).search(body, timings)
    server_timing(response, timings)
    return out


@api.post("/score", response_model=schemas.ScoreResponse, dependencies=KEY)
async def score(body: schemas.ScoreRequest, request: Request):
    return await frontend(request).score(body)


@api.post("/feedback", response_model=schemas.FeedbackResponse, status_code=202, dependencies=KEY)
async def feedback(body: schemas.FeedbackRequest, request: Request, response: Response):
    """What came of an item of an answer: logged as an outcome row by this replica, whichever
    answered; joined to the answer (or counted and left out) where training data is built."""
    front = frontend(request)
    response.headers[REPLICA_HEADER] = front.replica
    return front.feedback(body)
