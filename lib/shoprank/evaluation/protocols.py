"""Which evaluator a run gets, chosen in one place, and the metric each one leads with.

- `sampled` (a ranker recommending): each held-out positive among sampled candidates.
- `full_catalog` (a retriever, or `eval.protocol=full_catalog`): every catalog item is a
  candidate; stage one retrieves, the ranker (when given) reranks.
- `judgments` (`data.task=search`): NDCG@10 over each query's graded judged items.
- `search_catalog` (`data.task=search eval.protocol=full_catalog`, judgments with a `split`):
  every catalog item is a candidate for each held-out query; BM25, the zero-shot and the
  fine-tuned bi-encoder, and each z-summed with BM25 (evaluation/search_catalog.py).

Retraining (lib/shoprank/loop/retrain.py) has its own, time-based protocol,
`evaluation/newest_day.py`: trained on the days before the newest, candidate and production
scored on the newest day's positives among sampled candidates (not leave-one-out).
"""

from __future__ import annotations

from dataclasses import dataclass

from shoprank.config import Config
from shoprank.run import Run

PRIMARY = {
    "sampled": "ndcg@10",
    "full_catalog": "ndcg@10",
    "judgments": "ndcg@10",
    "search_catalog": "ndcg@10",
}


@dataclass(frozen=True)
class Models:
    """Exported model folders to evaluate; `model` is the run's own export."""

    model: str | None = None
    retriever: str | None = None
    ranker: str | None = None


def protocol(cfg: Config) -> str:
    if cfg.data.task == "search":
        return "search_catalog" if cfg.eval.protocol == "full_catalog" else "judgments"
    if cfg.model.kind == "retriever" or cfg.eval.protocol == "full_catalog":
        return "full_catalog"
    return "sampled"


def evaluate(run: Run, models: Models) -> tuple[dict[str, dict[str, float]], str]:
    """Zero-shot vs fine-tuned vs baselines by the run's protocol; (table, report path)."""
    name = protocol(run.cfg)
    if name == "search_catalog":
        from shoprank.evaluation import search_catalog

        return search_catalog.evaluate_run(run, models.retriever or models.model)
    if name == "judgments":
        from shoprank.evaluation import judgments

        return judgments.evaluate(run, models.ranker or models.retriever or models.model)
    if name == "full_catalog":
        from shoprank.evaluation import full_catalog

        retriever = models.retriever or run.cfg.eval.retriever or models.model
        return full_catalog.evaluate(run, retriever, models.ranker or run.cfg.eval.ranker)
    from shoprank.evaluation import sampled

    return sampled.evaluate(run, models.ranker or models.model)


def after_training(run: Run, export_dir: str) -> str:
    """What follows training: a retriever's blend weights chosen on valid, then the report on
    `eval.split`. Returns the report's path."""
    cfg = run.cfg
    if cfg.model.kind == "retriever" and cfg.data.task == "recommend" and cfg.eval.blend_trials:
        from shoprank.retrieval import blend

        blend.fit(run, export_dir)
    _, path = evaluate(run, Models(model=export_dir))
    return path
