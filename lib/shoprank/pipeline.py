"""The steps the train and evaluate jobs share: outputs folder, data, examples, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray

from shoprank import report
from shoprank.config import Config
from shoprank.data import read
from shoprank.data.examples import build_examples
from shoprank.data.load import Validated, counts_table, load_validated
from shoprank.data.tokenize import tokenize
from shoprank.evaluation import evaluate_groups, fit_baselines

EVAL_METRICS = ["auc", "ndcg@10", "recall@10", "logloss"]


def output_dir(cfg: Config) -> Path:
    """Reports, exports and quarantine files: beside the checkpoints when storage is local."""
    root = cfg.run.storage if "://" not in cfg.run.storage else "outputs"
    out = Path(root).resolve() / cfg.run.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def start(cfg: Config) -> Path:
    """Print and save the resolved config; returns the run's output folder."""
    out = output_dir(cfg)
    text = cfg.to_yaml()
    print("[shoprank] resolved config:\n" + text)
    (out / "config.yaml").write_text(text)
    return out


def ensure_data(cfg: Config) -> None:
    """Write the built-in synthetic shop when the configured catalog does not exist yet."""
    if read.exists(cfg.data.catalog) or cfg.data.generate_if_missing is None:
        return
    from shoprank.data.synthetic import generate_shop

    target = Path(cfg.data.catalog).parent
    print(f"[shoprank] {cfg.data.catalog} not found: generating the synthetic shop in {target}")
    print(f"[shoprank] {generate_shop(target, seed=cfg.run.seed)}")


def prepare(cfg: Config, out: Path) -> tuple[Validated, dict[str, ray.data.Dataset]]:
    """Validated data and the per-split example groups."""
    ensure_data(cfg)
    data = load_validated(cfg.data, str(out / "quarantine"))
    print("[shoprank] data quality:\n" + counts_table(data.counts))
    examples = build_examples(data.events, data.catalog, cfg.data, cfg.run.seed)
    return data, examples


def train_positive_ids(train_groups: ray.data.Dataset) -> list[str]:
    """The positive item of every training group: what popularity counts."""
    firsts = []
    for batch in train_groups.select_columns(["item_ids"]).iter_batches(batch_format="pyarrow"):
        firsts.extend(pc.list_element(batch["item_ids"], 0).to_pylist())
    return firsts


def write_eval_report(
    out: Path,
    title: str,
    table: dict[str, dict[str, float]],
    raw: dict[str, tuple[np.ndarray, np.ndarray]],
    history: list[dict],
    notes: list[tuple[str, str]],
) -> Path:
    """metrics.json plus a Markdown report with plots."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(table, indent=2))
    images = {"Metrics by model": report.bar_chart(table, EVAL_METRICS[:3], out / "metrics.png")}
    tuned = raw.get("fine-tuned ranker")
    if tuned is not None:
        scores, labels = tuned
        images["Fine-tuned scores: positives vs sampled negatives"] = report.score_histogram(
            scores[labels == 1], scores[labels == 0], out / "scores.png", "fine-tuned ranker"
        )
    if history:
        steps = [h["step"] for h in history]
        series = {"train loss": (steps, [h["train_loss"] for h in history])}
        for key in ("val_ndcg@10", "val_auc"):
            series[key] = (steps, [h[key] for h in history])
        images["Training"] = report.curve_plot(
            series, "optimizer step", "value", "training loss and validation", out / "training.png"
        )
    sections = [("Results", report.metrics_table(table, EVAL_METRICS)), *notes]
    return report.write_report(out, title, sections, images)


def print_table(table: dict[str, dict[str, float]]) -> None:
    width = max(len(name) for name in table)
    print(f"\n{'model':<{width}}  " + "  ".join(f"{m:>9}" for m in EVAL_METRICS))
    for name, row in table.items():
        print(
            f"{name:<{width}}  "
            + "  ".join(f"{row.get(m, float('nan')):9.4f}" for m in EVAL_METRICS)
        )


def evaluate_and_report(
    cfg: Config,
    out: Path,
    data: Validated,
    examples: dict[str, ray.data.Dataset],
    export_dir: str,
    history: list[dict],
) -> tuple[dict[str, dict[str, float]], Path]:
    """Zero-shot vs fine-tuned vs baselines on `eval.split`; writes metrics.json and report.md."""
    split = cfg.eval.split
    groups = tokenize(examples[split], cfg.model.name, cfg.model.max_length, keep_text=True)
    baselines = fit_baselines(cfg, data.catalog, train_positive_ids(examples["train"]))
    table, raw = evaluate_groups(cfg, groups.materialize(), data.catalog, export_dir, baselines)
    n_groups = len(next(iter(raw.values()))[0])
    protocol = (
        f"{n_groups} {split} users, each ranked over 1 held-out positive + "
        f"{cfg.data.eval_candidates - 1} sampled candidates; ties count against the model. "
        "Zero-shot = cosine of the pretrained encoder's mean-pooled context and item embeddings."
    )
    path = write_eval_report(
        out / f"report_{split}",
        f"shoprank ranker: {cfg.run.name} ({split})",
        table,
        raw,
        history,
        [("Protocol", protocol), ("Data quality", counts_table(data.counts))],
    )
    return table, path
