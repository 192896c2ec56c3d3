"""The Ray Serve application: retrieve -> rerank -> business rules behind an authenticated API.

Two layouts. `split`: two deployments, each autoscaled on its own:
- `Models`: the registry's production retriever and cross-encoder in one replica, torch given
  every CPU the replica holds. A request's retrieval and rerank run one after the other, each
  on all the replica's cores (measured on 2 cores: the ranker's 20 pairs take about half the time
  on 2 threads that they take on 1, and separate replicas with a share of the cores each left
  one idle while the other worked). Every pass runs on the replica's one torch thread, and
  requests that queue during a pass go into the next one together (serving/coalesce.py):
  their contexts into one pass of the context tower, their (context, item) pairs into one
  ranker pass (size and wait from its user_config). Stage one is the export's own (its blend,
  exact; `/search`: the ANN index).
- `Ingress`: the FastAPI routes of serving/frontend.py (key check, limits, feature store,
  rules) calling `Models` through a deployment handle.
`one` (what serve/config.yaml runs): the routes inside the model replica (deployment
`Server`): one process and no handle calls, for machines too small to give the Ingress cores
of its own (on 2 cores it served more than the split layout and the plain process).
Both models follow the registry: promote a version and each replica loads it beside the old
one, then swaps; requests in flight finish on the model they started with.

    serve run serve/config.yaml           # or: serve deploy serve/config.yaml (a cluster)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.util import metrics

from shoprank.registry import Registry
from shoprank.serving import services
from shoprank.serving.coalesce import Coalescer
from shoprank.serving.frontend import Backends, Frontend, api, install, stage_two_words
from shoprank.serving.schemas import AppArgs


def replica_threads(args: AppArgs) -> int:
    """torch threads for this replica: `torch_threads`, else the CPUs Ray gave it, rounded up
    (a replica holding 1.75 of 2 cores uses both; the Ingress's quarter is mostly idle)."""
    import math

    import ray

    if args.torch_threads is not None:
        return args.torch_threads
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    return max(1, math.ceil(cpus))


def close_frontend(replica: object) -> None:
    """A replica's __del__: Serve calls it when it stops the replica (after the app's own
    shutdown, which does the same): the served-events log's buffer is written, best effort,
    counted."""
    front = getattr(replica, "front", None)
    if front is not None:
        front.close()


class ModelReplica:
    """Both models and their batched forward passes: the `Models` deployment, and the model
    half of the one-deployment `Server`."""

    def __init__(self, args: AppArgs):
        self.threads = replica_threads(args)
        # Every torch call of the replica runs on this one thread, which also loads the models:
        # one pass at a time, with all the threads, while the event loop goes on with other
        # requests' HTTP, features and rules. (A pass on another thread than the one that
        # first ran torch was 15-25% slower: RESULTS.md, "BLAS threads".)
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch")
        self.retriever, self.ranker = self.torch_thread.submit(self.load, args).result()
        for service in filter(None, (self.retriever, self.ranker)):
            service.models.follow(args.poll_s)
        self.batch_requests = metrics.Histogram(
            "shoprank_ranker_batch_requests",
            description="Requests gathered into one ranker forward pass.",
            boundaries=[1, 2, 4, 8, 16, 32, 64],
        )
        self.batch_pairs = metrics.Histogram(
            "shoprank_ranker_batch_pairs",
            description="(context, item) pairs scored in one ranker forward pass.",
            boundaries=[1, 10, 50, 100, 200, 500, 1000, 2000, 5000],
        )
        self.passes = {"batches": 0, "requests": 0}  # the same, for bench/bench_serve.py
        self.retrieve_batch = Coalescer(self.retriever.retrieve_many, self.torch_thread)
        if self.ranker is not None:
            self.score_batch = Coalescer(
                self.ranker.score_many, self.torch_thread, observe=self.count
            )
        self.reconfigure(BATCHING)

    def load(self, args: AppArgs) -> tuple:
        services.use_threads(self.threads)
        return services.from_args(args)

    async def on_torch_thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.torch_thread, fn, *args)

    def reconfigure(self, config: dict) -> None:
        """user_config: max_batch_size (1 = no batching) and batch_wait_timeout_s, for both."""
        size = int(config.get("max_batch_size", BATCHING["max_batch_size"]))
        wait = float(config.get("batch_wait_timeout_s", BATCHING["batch_wait_timeout_s"]))
        for batcher in (self.retrieve_batch, getattr(self, "score_batch", None)):
            if batcher is not None:
                batcher.configure(size, wait)

    # Retrieval and rerank passes run on the torch thread, one at a time, each with all the
    # threads (two concurrent passes would fight over the same cores); requests arriving
    # meanwhile form the next pass (serving/coalesce.py).
    async def retrieve(self, history, query, extra, n) -> dict:
        return await self.retrieve_batch((history, query, extra, n))

    async def score(self, history, context, extra, item_ids) -> dict:
        return await self.score_batch((history, context, extra, item_ids))

    def count(self, requests: list[tuple]) -> None:
        self.batch_requests.observe(len(requests))
        self.batch_pairs.observe(sum(len(r[3]) for r in requests))
        self.passes["batches"] += 1
        self.passes["requests"] += len(requests)

    def describe(self) -> dict:
        return services.describe_models(self.retriever, self.ranker)

    def versions(self) -> dict[str, int | None]:
        return {
            "retriever": self.retriever.version(),
            "ranker": self.ranker.version() if self.ranker else None,
        }

    def batch_counts(self) -> dict[str, int]:
        """Ranker forward passes and the requests they held, since the replica started."""
        return dict(self.passes)

    async def threads_in_use(self) -> dict[str, int]:
        """torch's threads and the BLAS libraries', read on the torch thread (an OpenMP BLAS
        counts per thread); the bench states both."""
        return await self.on_torch_thread(services.threads_in_use)


# CPU requests: one replica of each fits a 2-core machine (1.75 + 0.25).
# Serve lets a replica hold 5 requests at once by default: `Models` must hold a full batch
# (max_batch_size) or batches never grow past 5; the Ingress only awaits it.
# No wait by default: a pass starts at once and batches form while the previous pass runs.
BATCHING = {"max_batch_size": 32, "batch_wait_timeout_s": 0.0}
Models = serve.deployment(
    name="Models",
    ray_actor_options={"num_cpus": 1.75},
    max_ongoing_requests=64,
    user_config=BATCHING,
)(ModelReplica)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    def __init__(self, models: DeploymentHandle, args: AppArgs):
        async def versions() -> dict[str, int | None]:
            return await models.versions.remote()

        async def describe() -> dict:
            got = await models.describe.remote()
            return stage_two_words(got, args)

        backends = Backends(
            retrieve=lambda *a: models.retrieve.remote(*a),
            score=(lambda *a: models.score.remote(*a)) if args.ranker else None,
            versions=versions,
            describe=describe,
        )
        self.front = Frontend(args, backends)
        install(self.front)

    __del__ = close_frontend


class OneReplica(ModelReplica):
    """layout "one": the routes served inside the model replica, calling the batched methods
    in-process. On a 2-core machine the Ingress and its handle calls cost about a tenth of a
    /search's CPU (RESULTS.md, "Both setups up, measured in turn")."""

    def __init__(self, args: AppArgs):
        super().__init__(args)

        async def versions() -> dict[str, int | None]:
            return self.versions()

        async def describe() -> dict:
            got = self.describe()
            return stage_two_words(got, args)

        backends = Backends(
            retrieve=self.retrieve,
            score=self.score if args.ranker else None,
            versions=versions,
            describe=describe,
        )
        self.front = Frontend(args, backends)
        install(self.front)

    __del__ = close_frontend


Server = serve.deployment(
    name="Server",
    ray_actor_options={"num_cpus": 2.0},
    max_ongoing_requests=128,
    user_config=BATCHING,
)(serve.ingress(api)(OneReplica))


def build_app(args: dict, deployment: dict | None = None) -> serve.Application:
    """The application `serve run serve/config.yaml` starts (its `args:` arrive here).
    `deployment`: Serve options of the model replica's deployment (`Server`, or `Models` when
    split), as a config's `deployments:` entry gives them (autoscaling_config, ...)."""
    parsed = AppArgs.model_validate(args)
    registry = Registry(parsed.registry)
    for name in filter(None, (parsed.retriever, parsed.ranker)):
        registry.get(name, parsed.alias)  # fail here, with the registry's message
    options = dict(deployment or {})
    given = {k: getattr(parsed, k) for k in BATCHING if getattr(parsed, k) is not None}
    if given:  # (a wait of 0 is a choice, not a default)
        options["user_config"] = BATCHING | given
    if parsed.layout == "one":
        return Server.options(**options).bind(parsed)
    return Ingress.bind(Models.options(**options).bind(parsed), parsed)
