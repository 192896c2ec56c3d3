"""Stage one as evaluated and as served: one class, one definition of every signal.

A retriever export carries everything its blended stage one needs:
- `index/`: the catalog's embeddings, in catalog order (jobs/embed.py);
- `blend.json`: the weights chosen on valid (absent: the retriever alone is stage one);
- `fusion.txt` / `fusion.json`: the LightGBM model that reorders the blend's top N
  (retrieval/fusion.py; absent: the blend's order is final);
- `signals/`: the statistics of the collaborative signals, fitted on the training groups of
  the data the model was trained on: item popularity and the co-visitation matrix. TF-IDF
  depends on the catalog texts alone and is refitted from them.

"The events before the moment scored" follows one rule in evaluation and serving: the signals'
statistics are those of the training snapshot the model version was built from (a retrain
refreshes them with the version); the history of the user being scored is what the caller
passes (evaluation: every item before the held-out one; serving: the feature store's history).
Scores are exact over the whole catalog: right for catalogs up to ~1e5 items.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from shoprank.config import Config
from shoprank.models.export_meta import read_export
from shoprank.retrieval import blend
from shoprank.retrieval.fusion import Fusion
from shoprank.retrieval.index import INDEX_DIR, read_embeddings


class StageOneError(ValueError):
    pass


class StageOne:
    """Exact [users, catalog] stage-one scores: the blend of a retriever export's signals when it
    has blend weights (reordered by its fusion model when it has one), else the retriever's
    inner product alone."""

    def __init__(
        self,
        item_ids: list[str],
        items: np.ndarray,
        weights: dict[str, float] | None,
        baselines: dict,
        decay: float,
        fusion: Fusion | None = None,
    ):
        self.item_ids, self.items = item_ids, items
        self.weights, self.baselines, self.decay = weights, baselines, decay
        self.fusion = fusion
        # Built once: scores() runs on the request path.
        self._row = {item: j for j, item in enumerate(item_ids)}
        self._items64 = items.astype(np.float64) if weights else items  # inner_products
        self._pairs = blend.pairs(items, baselines)

    @property
    def blended(self) -> bool:
        return bool(self.weights)

    @classmethod
    def from_export(
        cls, retriever_dir: str | Path, catalog: pa.Table, weights: dict | None = None
    ) -> StageOne:
        """The stage one of an export, for `catalog`: every item its index holds must be in the
        catalog (items added since are served once the catalog is embedded again). `weights`
        replace its blend's, and then its fusion (fitted on that blend) is not used."""
        meta = read_export(retriever_dir, kind="retriever")
        ids, items = read_embeddings(Path(retriever_dir) / INDEX_DIR)
        served = {item: r for r, item in enumerate(catalog["item_id"].to_pylist())}
        missing = [i for i in ids if i not in served]
        if missing:
            raise StageOneError(
                f"{retriever_dir}/{INDEX_DIR} holds {len(missing)} of its {len(ids)} items that "
                f"the catalog given here lacks (e.g. {missing[0]!r}): embed this catalog with "
                f"jobs/embed.py --model {retriever_dir}"
            )
        fusion = None if weights else Fusion.load(retriever_dir)
        weights = dict(weights) if weights else blend.load(retriever_dir)
        if not weights:
            return cls(ids, items, None, {}, 0.0)
        try:
            baselines, decay = blend.load_signals(
                retriever_dir, ids, weights, catalog, meta.data.item_template
            )
        except blend.SignalsError as err:
            raise StageOneError(str(err)) from None
        return cls(ids, items, weights, baselines, decay, fusion)

    def scores(self, contexts: np.ndarray, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """[users, items] scores; `contexts` are the retriever's context vectors, `histories`
        the users' item ids, newest first."""
        if not self.blended:
            return contexts @ self.items.T
        by_stage = self.stage_scores(contexts, histories)
        return by_stage.get("fused", by_stage["blend"])

    def stage_scores(
        self,
        contexts: np.ndarray,
        histories: Sequence[Sequence[str]],
        held_out: tuple[Config, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """{"blend": [users, items], and "fused" when the export has a fusion model}: the
        evaluation reports both.

        `held_out` = (config, each user's target) for the users the fusion was fitted on
        (valid): each user's fused scores then come from a fusion model fitted without them,
        so that a figure on valid, or stage two's mix chosen there, is not the fitted model's
        in-sample score."""
        # An item the catalog lacks has no signal to give.
        histories = [[i for i in h if i in self._row] for h in histories]
        signals = blend.signals(
            contexts, histories, self._items64, self.item_ids, self.baselines, self.decay
        )
        # A signal the blend was chosen without is no input of the fusion either.
        signals = {k: v for k, v in signals.items() if k in self.weights}
        out = {"blend": blend.blend(signals, self.weights)}
        if self.fusion is not None:
            rows = [[self._row[i] for i in h] for h in histories]
            if held_out is None:
                out["fused"] = self.fusion.scores(signals, out["blend"], rows, self._pairs)
            else:
                cfg, target = held_out
                out["fused"] = self.fusion.cross_fitted_scores(
                    cfg, signals, out["blend"], rows, target, self._pairs
                )
        return out


def for_evaluation(
    retriever_dir: str | Path, catalog: pa.Table, baselines: dict, decay: float, weights=None
) -> StageOne:
    """What evaluation ranks with: the export's own stage one (its saved signals, exactly what
    the Serve app serves), `weights` (eval.blend_weights) overriding its blend. An export from
    before signals were saved gets the run's baselines, fitted the same way."""
    if (Path(retriever_dir) / blend.SIGNALS_DIR / "signals.json").exists():
        return StageOne.from_export(retriever_dir, catalog, weights)
    ids, items = read_embeddings(Path(retriever_dir) / INDEX_DIR)
    if ids != catalog["item_id"].to_pylist():
        raise StageOneError(f"{retriever_dir}/{INDEX_DIR} does not cover this catalog")
    chosen = dict(weights) if weights else blend.load(retriever_dir)
    return StageOne(ids, items, chosen, baselines, decay)
