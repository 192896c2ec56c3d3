"""What the model replicas do, without Serve: stage one and stage two over catalog item ids.

Each service follows its registry alias (models.Following) and renders item texts and contexts
with the template and history settings its own model was trained with. The Serve deployments
(serving/app.py) wrap them; the plain single-process baseline of the benchmark calls them
directly.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.console import log
from shoprank.data.read import resolve
from shoprank.data.text import history_texts, render_context, render_items
from shoprank.data.validate import check_catalog, reason_counts, split_quarantine
from shoprank.evaluation.metrics import top_n
from shoprank.models.export_meta import ExportMeta, read_export
from shoprank.models.ranker import Ranker
from shoprank.precision import describe as host_precision
from shoprank.precision import ranker_backend
from shoprank.precision import resolve as resolve_precision
from shoprank.retrieval import rerank
from shoprank.retrieval.stage_one import StageOne
from shoprank.serving.follow import Following, RetrieverModel
from shoprank.serving.schemas import AppArgs


def use_threads(threads: int) -> None:
    """torch gets `threads`, numpy's BLAS one. A request alternates short numpy work (the blend,
    the fusion, the rules) with torch passes, and OpenBLAS's threads spin a while after each
    call, taking the cores from torch's: on 2 cores a lone rerank of 20 pairs took 160 ms
    instead of 85 with BLAS on 2 threads (RESULTS.md, "BLAS threads")."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(1, user_api="blas")


def threads_in_use() -> dict[str, int]:
    """This thread's view: torch's threads and the most any BLAS library would use."""
    import torch
    from threadpoolctl import threadpool_info

    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    return {"torch": torch.get_num_threads(), "blas": max(blas, default=0)}


def read_catalog(path: str) -> pa.Table:
    """The catalog validated as training validated it: the rows a model can know, once each."""
    fs, inner = resolve(path)
    good, bad = split_quarantine(check_catalog(pq.read_table(inner, filesystem=fs)))
    if bad.num_rows:
        log(f"catalog {path}: {bad.num_rows} rows left out {reason_counts(bad)}")
    return good


def item_texts(catalog: pa.Table, meta: ExportMeta) -> tuple[dict[str, str], dict[str, str]]:
    """Item id -> text, as the model was trained: (as a candidate, as read in a context)."""
    rendered = render_items(catalog, meta.data.item_template)
    ids = catalog["item_id"].to_pylist()
    return dict(zip(ids, rendered, strict=True)), history_texts(catalog, meta.data, rendered)


def from_args(args: AppArgs) -> tuple[RetrieverService, RankerService | None]:
    """The app's two services as its args (`schemas.AppArgs`) ask: the Serve replica's and the
    plain baseline's alike."""
    catalog = read_catalog(args.catalog)
    retriever = RetrieverService(
        args.registry, args.retriever, args.alias, catalog, args.retriever_precision
    )
    ranker = None
    if args.ranker:
        ranker = RankerService(
            args.registry,
            args.ranker,
            args.alias,
            catalog,
            args.ranker_precision,
            args.ranker_max_length,
        )
    return retriever, ranker


def describe_models(retriever: RetrieverService, ranker: RankerService | None) -> dict:
    """The served models as /version words them: stage one, the ranker's weights, and the
    precision each computes in on this host (resolved as evaluation resolves it)."""
    computed = {"retriever": retriever.precision, "ranker": ranker.precision if ranker else None}
    return {
        "retriever": retriever.describe(),
        "ranker_weights": ranker.weights() if ranker else None,
        "precision": {**computed, **host_precision()},
    }


class RetrieverService:
    """Stage one: for a history, the export's own stage one (`retrieval.stage_one.StageOne`,
    the blend it was evaluated with, exact over the catalog); for a query, the retriever's
    index (search is evaluated on the bi-encoder alone)."""

    def __init__(
        self, registry: str, name: str, alias: str, catalog: pa.Table, precision: str = "auto"
    ):
        self.precision = resolve_precision(precision)

        def load(folder: str, version) -> tuple:
            model = RetrieverModel(folder, bf16=self.precision == "bf16")
            # Refused (the previous version keeps serving) when its index or signals do not
            # line up with the served catalog.
            stage = StageOne.from_export(folder, catalog)
            decision = rerank.load(folder)
            log(f"{name} v{version.version}: stage one = {describe(stage)}")
            if decision is not None:
                log(f"{name} v{version.version}: {decision.summary()}")
            # (how items read inside a context: the index holds the items' own texts)
            return model, history_texts(catalog, model.meta.data), stage, decision

        self.models = Following(registry, name, load, alias)

    def retrieve(
        self, history: list[str] | None, query: str | None, extra: str | None, n: int
    ) -> dict:
        """The n best items for a query, or for a history (newest first) plus any extra
        context words, with their stage-one scores."""
        return self.retrieve_many([(history, query, extra, n)])[0]

    def retrieve_many(self, requests: list[tuple]) -> list[dict]:
        """Requests (history, query, extra, n), each answered as `retrieve` would, in two
        forward passes of the context tower at most: one for the blended histories (and one
        catalog product), one for the queries and unblended contexts (and one index search)."""
        (model, texts, stage, decision), version = self.models.current()
        record = decision.model_dump() if decision is not None else None
        out: list[dict | None] = [None] * len(requests)
        blended: list[tuple[int, str, list[str], int]] = []
        nearest: list[tuple[int, str, int]] = []  # queries, and contexts without a blend
        for j, (history, query, extra, n) in enumerate(requests):
            if query is not None:
                nearest.append((j, query, n))
                continue
            context = render_context(history or [], texts, model.meta.data, extra)
            if stage.blended:
                blended.append((j, context, history or [], n))
            else:
                nearest.append((j, context, n))
        if nearest:
            scores, rows = model.search([t for _, t, _ in nearest], max(n for *_, n in nearest))
            for row, (j, _, n) in enumerate(nearest):
                keep = rows[row, :n] >= 0
                out[j] = {
                    "item_ids": [model.index.item_ids[r] for r in rows[row, :n][keep]],
                    "scores": scores[row, :n][keep].tolist(),
                    "version": version,
                    "stage_one": "retriever",
                    "rerank": record,
                }
        if blended:
            scores = stage.scores(model.embed([b[1] for b in blended]), [b[2] for b in blended])
            for row, (j, _, _, n) in enumerate(blended):
                top = top_n(scores[row : row + 1], n)[0]
                out[j] = {
                    "item_ids": [stage.item_ids[r] for r in top],
                    "scores": scores[row, top].tolist(),
                    "version": version,
                    "stage_one": "blend",
                    "rerank": record,
                }
        return out

    def describe(self) -> dict:
        (_, _, stage, decision), version = self.models.current()
        return {
            "version": version,
            "stage_one": describe(stage),
            "rerank": decision.summary() if decision else "no rerank.json: no rerank decision",
            "rerank_weights": decision.ranker_weights if decision and decision.improves else None,
        }

    def version(self) -> int:
        return self.models.current()[1]


def describe(stage: StageOne) -> str:
    if not stage.blended:
        return "the retriever alone (its export has no blend.json)"
    out = "blend " + ", ".join(f"{k} {v:g}" for k, v in stage.weights.items() if v)
    if stage.fusion is not None:
        out += f"; its top {stage.fusion.top} reordered by the fusion model"
    return out


class RankerService:
    def __init__(
        self,
        registry: str,
        name: str,
        alias: str,
        catalog: pa.Table,
        precision: str = "auto",
        max_length: int | None = None,
    ):
        self.precision = ranker_backend(precision)

        def load(folder: str, version) -> tuple[Ranker, tuple[dict, dict], ExportMeta, str]:
            meta = read_export(folder, kind="ranker")
            ranker = Ranker.from_export(folder, precision, max_length=max_length)
            return ranker, item_texts(catalog, meta), meta, rerank.weights_digest(folder)

        self.models = Following(registry, name, load, alias)

    def score_many(self, requests: list[tuple]) -> list[dict]:
        """Requests (history, context, extra, item ids) scored in one forward pass; each gets
        its scores in its own item order (None for ids the catalog lacks)."""
        (model, (texts, history_of), meta, weights), version = self.models.current()
        sep = meta.data.history_separator
        contexts, items, known_per = [], [], []
        for history, context, extra, item_ids in requests:
            if context is None:  # a history, rendered as the ranker was trained
                context = render_context(history, history_of, meta.data, extra)
            elif extra:
                context = f"{context}{sep}{extra}"
            known = [i for i in item_ids if i in texts]
            contexts += [context] * len(known)
            items += [texts[i] for i in known]
            known_per.append(known)
        scores = model.score(contexts, items)
        out, start = [], 0
        for (_, _, _, item_ids), known in zip(requests, known_per, strict=True):
            got = dict(zip(known, scores[start : start + len(known)].tolist(), strict=True))
            start += len(known)
            out.append(
                {
                    "scores": [got.get(i) for i in item_ids],
                    "unknown": [i for i in item_ids if i not in got],
                    "version": version,
                    "weights": weights,
                }
            )
        return out

    def weights(self) -> str:
        """The digest of the served ranker's weights (what rerank.json records)."""
        return self.models.current()[0][3]

    def version(self) -> int:
        return self.models.current()[1]
