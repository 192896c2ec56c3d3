"""The time-based protocol of retraining: trained on the days before the newest, scored on it.

Every event gets a `split` by the UTC day of its `ts`: the newest day is `test`, the window
of days before it `train`, older days (read for users' histories only) `history`, for which
no group is built. The groups are the sampled protocol's (evaluation/sampled.py): each of the
newest day's positives, with every earlier positive of the user as its history, among
`data.eval_candidates - 1` sampled items. Every model scores the same groups and the metrics
come from evaluation/metrics.py, so candidate and production are compared like with like.
Unlike leave-one-out, nothing a model trained on happened after what it is scored on.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from shoprank.console import log
from shoprank.evaluation.sampled import group_metrics
from shoprank.evaluation.scorers import BaselineScorer, CrossEncoderScorer, collect_scores

HISTORY = "history"  # events older than the training window: contexts only
COLUMNS = ["ndcg@10", "recall@10", "auc", "logloss"]


def day_of(ts: pa.ChunkedArray | pa.Array) -> pa.Array:
    """The UTC day (YYYY-MM-DD) of naive UTC timestamps: the day its `dt=` partition names."""
    return pc.strftime(ts, format="%Y-%m-%d")


def split_by_day(events: ray.data.Dataset, newest: str, first_train: str) -> ray.data.Dataset:
    """`split` by day: the newest day `test`, [first_train, newest) `train`, earlier days
    `history`; any split column the source had is replaced."""

    def label(batch: pa.Table) -> pa.Table:
        day = day_of(batch["ts"])
        split = pc.if_else(
            pc.equal(day, newest),
            "test",
            pc.if_else(pc.greater_equal(day, first_train), "train", HISTORY),
        )
        if "split" in batch.column_names:
            batch = batch.drop_columns(["split"])
        return batch.append_column("split", split.cast(pa.string()))

    return events.map_batches(label, batch_format="pyarrow")


def score_models(
    groups: ray.data.Dataset,
    models: dict[str, str],
    precision: str,
    baselines: dict | None = None,
    num_cpus: float = 1,
    in_process_below: int = 0,
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metrics of each exported ranker (name -> folder) and baseline on the same groups, and
    their raw (scores, labels), rows lined up across models when the groups carry a `key`
    (`with_keys`)."""
    runs: dict[str, tuple] = {
        name: (CrossEncoderScorer, {"model_dir": folder, "precision": precision})
        for name, folder in models.items()
    }
    for name, fitted in (baselines or {}).items():
        runs[name] = (BaselineScorer, {"baseline": fitted})
    table, raw = {}, {}
    for name, (scorer, kwargs) in runs.items():
        started = time.perf_counter()
        scores, labels, keys = collect_scores(
            groups, scorer, kwargs, num_cpus, in_process_below=in_process_below
        )
        if keys is not None:
            order = np.argsort(keys, kind="stable")
            scores, labels = scores[order], labels[order]
        raw[name] = (scores, labels)
        table[name] = group_metrics(scores, labels, probabilistic=scorer is CrossEncoderScorer)
        log(
            f"newest day, {name}: ndcg@10 {table[name]['ndcg@10']:.4f} on {len(scores)} groups "
            f"({time.perf_counter() - started:.0f} s)"
        )
    return table, raw
