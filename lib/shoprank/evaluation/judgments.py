"""Search evaluation: NDCG@10 over graded relevance judgments (query, item, gain).

Every judged (query, item) pair is scored by each model; within a query the items are
ordered by score and NDCG@10 uses the judged gains (ESCI 1 / 0.1 / 0.01 / 0, WANDS 2 / 1 / 0,
or the synthetic shop's 0..3). Ties are averaged (metrics.graded_ndcg), so a constant scorer
gets no credit for the judgments' own order.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from shoprank.config import Config
from shoprank.data.load import counts_table
from shoprank.data.text import render_items
from shoprank.data.tokenize import KEY
from shoprank.evaluation import metrics, report
from shoprank.evaluation.baselines import Popularity, TfidfHistory
from shoprank.evaluation.scorers import (
    CrossEncoderScorer,
    collect_scores,
    precision_words,
    ranker_settings,
)
from shoprank.models.export_meta import read_export
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval.embed import embed_text_list
from shoprank.run import Run

PRIMARY = "ndcg@10"


def _bi_encoder_scores(
    spec: EncoderSpec, queries: list[str], items: list[str], cfg: Config
) -> np.ndarray:
    """Cosine of each pair, embedding every distinct query and item text once."""
    uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
    ui, ii = np.unique(np.asarray(items, dtype=object), return_inverse=True)
    q = embed_text_list(list(uq), spec, "context", cfg)
    d = embed_text_list(list(ui), spec, "item", cfg)
    return np.einsum("nd,nd->n", q[qi], d[ii])


def _cross_encoder_scores(
    model_dir: str, queries: list[str], items: list[str], cfg: Config
) -> np.ndarray:
    """The ranker over every pair; each pair is a group of one, keyed to keep its place."""
    table = pa.table(
        {
            KEY: pa.array(np.arange(len(queries)), pa.int64()),
            "context": pa.array(queries, pa.string()),
            "item_texts": pa.array([[t] for t in items], pa.list_(pa.string())),
            "labels": pa.array([[0.0]] * len(items), pa.list_(pa.float32())),
        }
    )
    scores, _, keys = collect_scores(
        ray.data.from_arrow(table),
        CrossEncoderScorer,
        ranker_settings(cfg, model_dir),
        num_cpus=cfg.eval.num_cpus,
        batch_size=cfg.train.eval_batch_size,
        in_process_below=cfg.eval.score_in_process_below,
    )
    out = np.empty(len(queries), dtype=np.float32)
    out[keys] = scores[:, 0]
    return out


def score_judgments(
    cfg: Config,
    catalog: pa.Table,
    judgments: pa.Table,
    model_dir: str | None,
    baselines: dict,
    k: int = 10,
) -> dict[str, dict[str, float]]:
    """NDCG@k per model over every judged query, plus how many queries counted."""
    ids = catalog["item_id"].to_pylist()
    texts = dict(zip(ids, render_items(catalog, cfg.data.item_template), strict=True))
    queries = judgments["query"].to_pylist()
    item_ids = judgments["item_id"].to_pylist()
    items = [texts[i] for i in item_ids]
    qids = np.asarray(judgments["query_id"].to_pylist(), dtype=object)
    gains = judgments["label"].to_numpy()

    scores: dict[str, np.ndarray] = {}
    for name, fitted in baselines.items():  # co-visitation needs a history: not for queries
        if isinstance(fitted, Popularity):
            scores[name] = fitted.score(item_ids)
        elif isinstance(fitted, TfidfHistory):
            scores[name] = fitted.score_queries(queries, item_ids)
    if cfg.eval.zero_shot:
        scores[f"zero-shot {cfg.model.name}"] = _bi_encoder_scores(
            EncoderSpec.zero_shot(cfg), queries, items, cfg
        )
    if model_dir:
        kind = read_export(model_dir).kind
        if kind == "retriever":
            tuned = _bi_encoder_scores(EncoderSpec.from_export(model_dir), queries, items, cfg)
        else:
            tuned = _cross_encoder_scores(model_dir, queries, items, cfg)
        scores[f"fine-tuned {kind}"] = tuned
    n_queries = len(set(qids[gains > 0]))
    return {
        name: {f"ndcg@{k}": metrics.graded_ndcg(qids, gains, s, k=k), "queries": n_queries}
        for name, s in scores.items()
    }


def evaluate(run: Run, model_dir: str | None) -> tuple[dict[str, dict[str, float]], str]:
    """NDCG@10 over the judgments file: zero-shot vs fine-tuned vs baselines; report.md."""
    cfg, data = run.cfg, run.data
    if data.judgments is None:
        raise ValueError(
            f"data.task=search is evaluated on judgments, but data.judgments={cfg.data.judgments!r}"
            " does not exist; point it at a judgments Parquet (jobs/prepare.py esci|wands)"
        )
    judgments = data.judgments
    if "split" in judgments.column_names:  # a source that pins each query's split: eval.split's
        judgments = judgments.filter(pc.equal(judgments["split"], cfg.eval.split))
    table = score_judgments(cfg, data.catalog, judgments, model_dir, run.baselines)
    folder = run.out / "report_search"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(table, indent=2))
    images = {"NDCG@10 by model": report.bar_chart(table, ["ndcg@10"], folder / "metrics.png")}
    if run.history or run.steps:
        images["Training"] = report.training_curve(
            run.history, run.steps, ["val_ndcg@10"], folder / "training.png"
        )
    n_queries = int(next(iter(table.values()))["queries"]) if table else 0
    protocol = (
        f"{judgments.num_rows} judged (query, item) pairs over {n_queries} queries with a "
        "positive gain; each query's judged items ordered by the model's score, NDCG@10 with "
        "the judged gains (tied scores share their gains)."
    )
    sections = [
        ("Results", report.metrics_table(table, ["ndcg@10"])),
        ("Protocol", protocol),
        ("Data quality", counts_table(data.counts)),
        ("Training time", report.training_time(run.timing, run.steps) or "–"),
    ]
    path = report.write_report(
        folder, f"shoprank search: {cfg.run.name}", sections, images, precision_words(cfg)
    )
    report.print_table(table, ["ndcg@10"])
    return table, str(path)
