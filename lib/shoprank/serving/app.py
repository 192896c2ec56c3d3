"""The Ray Serve application: retrieve -> rerank -> business rules behind an authenticated API.

Three deployments, each autoscaled on its own (serve/config.yaml):
- `Retriever`: the registry's production retriever; embeds the context and scores the catalog
  with the export's own stage one (its blend, exact; `/search`: the ANN index).
- `Ranker`: the registry's production cross-encoder; `@serve.batch` gathers concurrent
  requests' (context, item) pairs into one forward pass (size and wait from its user_config).
- `Ingress`: the FastAPI routes of serving/frontend.py (key check, limits, feature store,
  rules) calling the two through deployment handles.
Both model deployments follow the registry: promote a version and each replica loads it beside
the old one, then swaps; requests in flight finish on the model they started with.

    serve run serve/config.yaml           # or: serve deploy serve/config.yaml (a cluster)
"""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from shoprank.registry import Registry
from shoprank.serving.frontend import Backends, Frontend, api, install, stage_two_words
from shoprank.serving.schemas import AppArgs
from shoprank.serving.services import RankerService, RetrieverService, read_catalog


def _following(service: type, args: AppArgs, name: str, precision: str):
    """A model service for this replica, polling the registry for new versions."""
    import torch

    torch.set_num_threads(args.torch_threads)  # replicas share the machine's cores
    out = service(args.registry, name, args.alias, read_catalog(args.catalog), precision)
    out.models.follow(args.poll_s)
    return out


# CPU requests: one replica of each fits a 2-core machine (0.5 + 1 + 0.25); the Retriever encodes
# one short context per request, the Ranker a batch of (context, item) pairs.
# Serve lets a replica hold 5 requests at once by default. The Ranker must hold a full batch
# (max_batch_size) or batches never grow past 5; the Ingress only awaits the other two.
@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=16)
class Retriever:
    def __init__(self, args: AppArgs):
        self.service = _following(RetrieverService, args, args.retriever, args.retriever_precision)

    def retrieve(self, history, query, extra, n) -> dict:
        return self.service.retrieve(history, query, extra, n)

    def describe(self) -> dict:
        return self.service.describe()

    def version(self) -> int:
        return self.service.version()


@serve.deployment(
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=64,
    user_config={"max_batch_size": 32, "batch_wait_timeout_s": 0.005},
)
class Ranker:
    def __init__(self, args: AppArgs):
        self.service = _following(RankerService, args, args.ranker, args.ranker_precision)
        self.batch_requests = metrics.Histogram(
            "shoprank_ranker_batch_requests",
            description="Requests gathered into one ranker forward pass (@serve.batch).",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self.batch_pairs = metrics.Histogram(
            "shoprank_ranker_batch_pairs",
            description="(context, item) pairs scored in one ranker forward pass.",
            boundaries=[1, 10, 50, 100, 200, 500, 1000, 2000, 5000],
        )
        self.passes = {"batches": 0, "requests": 0}  # the same, for jobs/bench_serve.py

    def reconfigure(self, config: dict) -> None:
        """user_config: max_batch_size (1 = no batching) and batch_wait_timeout_s."""
        self.score_batch.set_max_batch_size(int(config.get("max_batch_size", 32)))
        self.score_batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.005)))

    async def score(self, history, context, extra, item_ids) -> dict:
        return await self.score_batch((history, context, extra, item_ids))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def score_batch(self, requests: list[tuple]) -> list[dict]:
        out = self.service.score_many(requests)
        self.batch_requests.observe(len(requests))
        self.batch_pairs.observe(sum(len(r[3]) for r in requests))
        self.passes["batches"] += 1
        self.passes["requests"] += len(requests)
        return out

    def weights(self) -> str:
        return self.service.weights()

    def batch_counts(self) -> dict[str, int]:
        """Forward passes and the requests they held, since the replica started."""
        return dict(self.passes)

    def version(self) -> int:
        return self.service.version()


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    def __init__(self, retriever: DeploymentHandle, ranker: DeploymentHandle | None, args: AppArgs):
        async def versions() -> dict[str, int | None]:
            return {
                "retriever": await retriever.version.remote(),
                "ranker": await ranker.version.remote() if ranker else None,
            }

        async def describe() -> dict:
            weights = await ranker.weights.remote() if ranker else None
            return stage_two_words(await retriever.describe.remote(), args, weights)

        backends = Backends(
            retrieve=lambda *a: retriever.retrieve.remote(*a),
            score=(lambda *a: ranker.score.remote(*a)) if ranker else None,
            versions=versions,
            describe=describe,
        )
        install(Frontend(args, backends))


def build_app(args: dict) -> serve.Application:
    """The application `serve run serve/config.yaml` starts (its `args:` arrive here)."""
    parsed = AppArgs.model_validate(args)
    registry = Registry(parsed.registry)
    for name in filter(None, (parsed.retriever, parsed.ranker)):
        registry.get(name, parsed.alias)  # fail here, with the registry's message
    ranker = None
    if parsed.ranker:
        options = {}
        if parsed.max_batch_size is not None or parsed.batch_wait_timeout_s is not None:
            options["user_config"] = {
                "max_batch_size": parsed.max_batch_size or 32,
                "batch_wait_timeout_s": parsed.batch_wait_timeout_s or 0.005,
            }
        ranker = Ranker.options(**options).bind(parsed)
    return Ingress.bind(Retriever.bind(parsed), ranker, parsed)
