"""The sampled protocol (the ranker's): each held-out positive among sampled candidates.

Every validation or test user gets 1 held-out positive + `data.eval_candidates - 1` items
sampled from the catalog; each model scores the same groups; AUC, logloss and NDCG/Recall@10
come from the one metrics module (ties count against the model).
"""

from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pyarrow as pa
import ray

from shoprank.config import Config
from shoprank.console import log
from shoprank.data.load import counts_table
from shoprank.data.text import render_items
from shoprank.data.tokenize import KEY
from shoprank.evaluation import metrics, report
from shoprank.evaluation.metrics import paired_interval
from shoprank.evaluation.scorers import (
    BaselineScorer,
    CrossEncoderScorer,
    ZeroShotScorer,
    collect_scores,
    precision_words,
    ranker_settings,
)
from shoprank.run import Run

COLUMNS = ["auc", "ndcg@10", "recall@10", "logloss"]
PRIMARY = "ndcg@10"
TUNED = "fine-tuned ranker"


def group_metrics(scores: np.ndarray, labels: np.ndarray, probabilistic: bool) -> dict[str, float]:
    """AUC, NDCG@10, Recall@10 (and logloss when scores are logits of a probability)."""
    groups = np.repeat(np.arange(len(scores)), scores.shape[1])
    out = metrics.pointwise_and_ranking(groups, labels.ravel(), scores.ravel(), ks=(10,))
    if not probabilistic:
        out["logloss"] = float("nan")
    return out


def with_keys(groups: ray.data.Dataset) -> ray.data.Dataset:
    """A `key` per group from its user and candidates, so that every model's scores can be
    lined up group by group (Ray Data keeps no row order; identical groups share a key, and
    their scores too)."""

    def add(batch: pa.Table) -> pa.Table:
        users, items = batch["user_id"].to_pylist(), batch["item_ids"].to_pylist()
        keys = [
            int.from_bytes(
                hashlib.blake2b("\x1f".join([u, *i]).encode(), digest_size=8).digest(),
                "big",
                signed=True,
            )
            for u, i in zip(users, items, strict=True)
        ]
        return batch.append_column(KEY, pa.array(keys, pa.int64()))

    return groups.map_batches(add, batch_format="pyarrow")


def evaluate_groups(
    cfg: Config, groups: ray.data.Dataset, catalog: pa.Table, model_dir: str, baselines: dict
) -> tuple[dict[str, dict[str, float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Metrics for zero-shot, fine-tuned and baselines on the same groups, plus raw scores."""
    bf16 = cfg.train.bf16
    runs: dict[str, tuple] = {}
    if cfg.eval.zero_shot:
        runs["zero-shot " + cfg.model.name] = (
            ZeroShotScorer,
            {
                "model": cfg.model,
                "item_ids": catalog["item_id"].to_pylist(),
                "item_texts": render_items(catalog, cfg.data.item_template),
                "bf16": bf16,
            },
        )
    runs[TUNED] = (
        CrossEncoderScorer,
        ranker_settings(cfg, model_dir),
    )
    for name, fitted in baselines.items():
        runs[name] = (BaselineScorer, {"baseline": fitted})
    table, raw = {}, {}
    n = groups.count()
    for name, (scorer, kwargs) in runs.items():
        started = time.perf_counter()
        log(f"scoring {n} {cfg.eval.split} groups of {cfg.data.eval_candidates} with {name}")
        scores, labels, keys = collect_scores(
            groups,
            scorer,
            kwargs,
            num_cpus=cfg.eval.num_cpus,
            in_process_below=cfg.eval.score_in_process_below,
        )
        if keys is not None:  # every model's rows in one order: paired comparisons
            order = np.argsort(keys, kind="stable")
            scores, labels = scores[order], labels[order]
        raw[name] = (scores, labels)
        table[name] = group_metrics(scores, labels, probabilistic=scorer is CrossEncoderScorer)
        log(f"{name}: {table[name][PRIMARY]:.4f} {PRIMARY} ({time.perf_counter() - started:.0f} s)")
    return table, raw


def leads(
    table: dict[str, dict[str, float]], raw: dict, level: float = 0.95
) -> list[tuple[str, float, float]]:
    """The fine-tuned ranker against its own zero-shot self and against the strongest other
    model, on the same users: (other, mean per-user NDCG@10 difference, paired interval
    half-width) each, so the report says whether fine-tuning leads by more than the noise."""
    others = [name for name in raw if name != TUNED]
    if TUNED not in raw or not others:
        return []
    best = max(others, key=lambda name: table[name][PRIMARY])
    against = [name for name in others if name.startswith("zero-shot") and name != best]
    return [
        (name, *paired_interval(raw[TUNED], raw[name], PRIMARY, level)) for name in [*against, best]
    ]


def leads_text(found: list[tuple[str, float, float]], n_users: int) -> str:
    """One sentence per comparison of `leads`, whose last is the strongest other model."""
    if not found:
        return "–"
    lines = []
    for i, (other, gain, half) in enumerate(found):
        verdict = "leads" if gain > half else "trails" if gain < -half else "is level with"
        role = ", the strongest other model" if i == len(found) - 1 else ""
        lines.append(
            f"The fine-tuned ranker {verdict} {other}{role}: {gain:+.4f} {PRIMARY} "
            f"±{half:.4f} (95% paired interval over the same {n_users} users)."
        )
    return "\n".join(lines)


def evaluate(run: Run, model_dir: str) -> tuple[dict[str, dict[str, float]], str]:
    """Zero-shot vs fine-tuned vs baselines on `eval.split`; writes metrics.json and report.md."""
    cfg, split = run.cfg, run.cfg.eval.split
    groups = run.examples[split]
    table, raw = evaluate_groups(
        cfg, with_keys(groups).materialize(), run.data.catalog, model_dir, run.baselines
    )
    n_groups = len(next(iter(raw.values()))[0])
    fine_tuning = leads_text(leads(table, raw), n_groups)
    protocol = (
        f"{n_groups} {split} users, each ranked over 1 held-out positive + "
        f"{cfg.data.eval_candidates - 1} sampled candidates; ties count against the model. "
        "Zero-shot = cosine of the pretrained encoder's mean-pooled context and item embeddings."
    )
    out = run.out / f"report_{split}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    images = {"Metrics by model": report.bar_chart(table, COLUMNS[:3], out / "metrics.png")}
    tuned = raw.get(TUNED)
    if tuned is not None:
        scores, labels = tuned
        images["Fine-tuned scores: positives vs sampled negatives"] = report.score_histogram(
            scores[labels == 1], scores[labels == 0], out / "scores.png", "fine-tuned ranker"
        )
    if run.history or run.steps:
        images["Training"] = report.training_curve(
            run.history, run.steps, ["val_ndcg@10", "val_auc"], out / "training.png"
        )
    sections = [
        ("Results", report.metrics_table(table, COLUMNS)),
        ("What fine-tuning buys", fine_tuning),
        ("Protocol", protocol),
        ("Data quality", counts_table(run.data.counts)),
        ("Training time", report.training_time(run.timing, run.steps) or "–"),
    ]
    path = report.write_report(
        out, f"shoprank ranker: {cfg.run.name} ({split})", sections, images, precision_words(cfg)
    )
    report.print_table(table, COLUMNS)
    for line in fine_tuning.splitlines():
        log(line)
    return table, str(path)
