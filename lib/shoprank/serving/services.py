"""What the model replicas do, without Serve: stage one and stage two over catalog item ids.

Each service follows its registry alias (models.Following) and renders item texts and contexts
with the template and history settings its own model was trained with. The Serve deployments
(serving/app.py) wrap them; the plain single-process baseline of the benchmark calls them
directly.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from shoprank.data.read import resolve
from shoprank.data.text import render_context, render_items
from shoprank.models.export_meta import ExportMeta, read_export
from shoprank.models.ranker import Ranker
from shoprank.serving.follow import Following, RetrieverModel


def read_catalog(path: str) -> pa.Table:
    fs, inner = resolve(path)
    return pq.read_table(inner, filesystem=fs)


def item_texts(catalog: pa.Table, meta: ExportMeta) -> dict[str, str]:
    """Item id -> text, rendered with the template the model was trained with."""
    ids = catalog["item_id"].to_pylist()
    return dict(zip(ids, render_items(catalog, meta.data.item_template), strict=True))


class RetrieverService:
    def __init__(self, registry: str, name: str, alias: str, catalog: pa.Table):
        def load(folder: str, version) -> tuple[RetrieverModel, dict[str, str]]:
            model = RetrieverModel(folder)
            return model, item_texts(catalog, model.meta)

        self.models = Following(registry, name, load, alias)

    def retrieve(
        self, history: list[str] | None, query: str | None, extra: str | None, n: int
    ) -> dict:
        """The n nearest items to a query, or to the context built from a history (newest
        first) plus any extra context words."""
        (model, texts), version = self.models.current()
        if query is not None:
            context = query
        else:
            context = render_context(history or [], texts, model.meta.data, extra)
        scores, rows = model.search([context], n)
        keep = rows[0] >= 0
        ids = [model.index.item_ids[r] for r in rows[0][keep]]
        return {"item_ids": ids, "scores": scores[0][keep].tolist(), "version": version}

    def version(self) -> int:
        return self.models.current()[1]


class RankerService:
    def __init__(
        self, registry: str, name: str, alias: str, catalog: pa.Table, precision: str = "bf16"
    ):
        def load(folder: str, version) -> tuple[Ranker, dict[str, str], ExportMeta]:
            meta = read_export(folder, kind="ranker")
            return Ranker.from_export(folder, precision), item_texts(catalog, meta), meta

        self.models = Following(registry, name, load, alias)

    def score_many(self, requests: list[tuple]) -> list[dict]:
        """Requests (history, context, extra, item ids) scored in one forward pass; each gets
        its scores in its own item order (None for ids the catalog lacks)."""
        (model, texts, meta), version = self.models.current()
        sep = meta.data.history_separator
        contexts, items, known_per = [], [], []
        for history, context, extra, item_ids in requests:
            if context is None:  # a history, rendered as the ranker was trained
                context = render_context(history, texts, meta.data, extra)
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
                }
            )
        return out

    def version(self) -> int:
        return self.models.current()[1]
