"""The steps the train and evaluate jobs share: outputs folder, data, examples, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import ray

from shoprank import metrics, report, search, two_stage
from shoprank.config import Config
from shoprank.data import read
from shoprank.data.examples import build_examples, positive_only
from shoprank.data.load import Validated, counts_table, load_validated
from shoprank.data.text import render_items
from shoprank.data.tokenize import for_model, tokenize, tokenize_items
from shoprank.evaluation import evaluate_groups, fit_baselines
from shoprank.export import export_model
from shoprank.retrieval import mine_hard_negatives, text_rows

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
    return data, examples_for(cfg, data)


def examples_for(cfg: Config, data: Validated) -> dict[str, ray.data.Dataset]:
    """The per-split example groups that `cfg.data` asks for (negatives, hard negatives...)."""
    examples = build_examples(data.events, data.catalog, cfg.data, cfg.run.seed)
    if cfg.data.hard_negatives:
        mined = mine_hard_negatives(examples["train"], cfg, data.catalog).materialize()
        print(f"[shoprank] {cfg.data.hard_negatives} hard negatives added to each training group")
        examples["train"] = mined
    return examples


def training_datasets(
    cfg: Config, data: Validated, examples: dict[str, ray.data.Dataset]
) -> dict[str, ray.data.Dataset]:
    """Tokenized, materialised datasets for `training.fit`, as the model kind needs them."""
    ids = data.catalog["item_id"].to_pylist()
    valid = examples["valid"]
    if cfg.model.kind == "retriever":  # validated on the full catalog: the positive suffices
        valid = valid.map_batches(positive_only, batch_format="pyarrow")
    out = {
        "train": for_model(examples["train"], cfg, ids).materialize(),
        "valid": for_model(valid, cfg, ids).materialize(),
    }
    if cfg.model.kind == "retriever":
        items = text_rows(render_items(data.catalog, cfg.data.item_template))
        out["catalog"] = tokenize_items(items, cfg.model.name, cfg.model.max_length).materialize()
    return out


def export_run(
    cfg: Config,
    data: Validated,
    checkpoint,
    best: dict,
    history: list[dict],
    out_dir: Path,
    **metadata,
) -> str:
    """A training checkpoint as a plain Hugging Face folder, with where it came from."""
    with checkpoint.as_directory() as ckpt_dir:
        return export_model(
            ckpt_dir,
            cfg,
            str(out_dir),
            {
                "metrics": best,
                "data": {p: read.snapshot([p]) for p in (cfg.data.catalog, cfg.data.events)},
                "data_quality": data.counts,
                "history": history,
                **metadata,
            },
        )


def finish(
    cfg: Config,
    out: Path,
    data: Validated,
    examples: dict[str, ray.data.Dataset],
    export_dir: str,
    history: list[dict],
) -> Path:
    """After training: a retriever's blend weights, then the report on `eval.split`."""
    # A retriever's blended stage one: weights of its other signals chosen on valid.
    if cfg.model.kind == "retriever" and cfg.data.task == "recommend" and cfg.eval.blend_trials:
        tune_blend(cfg, data, examples, export_dir)
    # Zero-shot vs fine-tuned vs baselines. Search on the judgments (NDCG@10); recommendation
    # on eval.split, a retriever by the full-catalog protocol through its freshly built ANN
    # index, a ranker on sampled candidates.
    if cfg.data.task == "search":
        _, path = search_report(cfg, out, data, examples, export_dir, history)
    elif cfg.model.kind == "retriever":
        _, path = full_catalog_report(
            cfg, out, data, examples, export_dir, cfg.eval.ranker, history
        )
    else:
        table, path = evaluate_and_report(cfg, out, data, examples, export_dir, history)
        print_table(table)
    return path


def train_pairs(train_groups: ray.data.Dataset) -> tuple[list[str], list[list[str]]]:
    """Every training group's positive and the history before it: what baselines learn from."""
    positives, histories = [], []
    columns = ["item_ids", "history_ids"]
    for batch in train_groups.select_columns(columns).iter_batches(batch_format="pyarrow"):
        positives.extend(pc.list_element(batch["item_ids"], 0).to_pylist())
        histories.extend(batch["history_ids"].to_pylist())
    return positives, histories


def training_curve(history: list[dict], keys: list[str], path: Path) -> Path:
    steps = [h["step"] for h in history]
    series = {"train loss": (steps, [h["train_loss"] for h in history])}
    for key in keys:
        if key in history[0]:
            series[key] = (steps, [h[key] for h in history])
    return report.curve_plot(series, "optimizer step", "value", "training and validation", path)


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
        images["Training"] = training_curve(
            history, ["val_ndcg@10", "val_auc"], out / "training.png"
        )
    sections = [("Results", report.metrics_table(table, EVAL_METRICS)), *notes]
    return report.write_report(out, title, sections, images)


def print_table(table: dict[str, dict[str, float]], columns: list[str] = EVAL_METRICS) -> None:
    width = max(len(name) for name in table)
    print(f"\n{'model':<{width}}  " + "  ".join(f"{m:>9}" for m in columns))
    for name, row in table.items():
        print(f"{name:<{width}}  " + "  ".join(f"{row.get(m, float('nan')):9.4f}" for m in columns))


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
    baselines = fit_baselines(cfg, data.catalog, *train_pairs(examples["train"]))
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


def full_catalog_report(
    cfg: Config,
    out: Path,
    data: Validated,
    examples: dict[str, ray.data.Dataset],
    retriever_dir: str | None,
    ranker_dir: str | None,
    history: list[dict],
) -> tuple[dict[str, dict[str, float]], Path]:
    """Stage one and two on `eval.split` by the full-catalog protocol; report with plots."""
    split = cfg.eval.split
    baselines = fit_baselines(cfg, data.catalog, *train_pairs(examples["train"]))
    outcome = two_stage.evaluate(
        cfg, data.catalog, examples[split], baselines, retriever_dir, ranker_dir
    )
    table = outcome.table(cfg.eval.ks)
    columns = [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")]
    folder = out / f"report_{split}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(
        json.dumps({"metrics": table, "timings_s": outcome.timings}, indent=2)
    )
    n = cfg.eval.retrieve_top
    curves = {name: metrics.recall_curve(r, n) for name, r in outcome.ranks.items()}
    images = {
        "Metrics by model": report.bar_chart(table, columns, folder / "metrics.png"),
        f"Recall@K, K = 1..{n}": report.curve_plot(
            curves,
            "K",
            "Recall@K",
            f"full catalog ({data.catalog.num_rows} items)",
            folder / "recall_at_k.png",
        ),
    }
    if history:
        images["Training"] = training_curve(
            history, ["val_ndcg@10", "val_recall@10"], folder / "training.png"
        )
    users = len(next(iter(outcome.ranks.values())))
    protocol = (
        f"{users} {split} users; each held-out item ranked among all "
        f"{data.catalog.num_rows} catalog items (history not removed, ties count against the "
        f"model). Stage one retrieves the top {n}; its candidate recall at {n}: "
        + ", ".join(f"{k} {float(np.mean(r < n)):.4f}" for k, r in outcome.ranks.items())
        + "."
    )
    timings = ", ".join(f"{k} {v} s" for k, v in outcome.timings.items())
    sections = [
        ("Results", report.metrics_table(table, columns)),
        ("Protocol", protocol),
        ("Stages", "\n\n".join(outcome.notes) or "–"),
        ("Timings", timings),
        ("Data quality", counts_table(data.counts)),
    ]
    title = f"shoprank retrieval: {cfg.run.name} ({split}, full catalog)"
    path = report.write_report(folder, title, sections, images)
    print_table(table, columns)
    return table, path


def tune_blend(
    cfg: Config, data: Validated, examples: dict[str, ray.data.Dataset], retriever_dir: str
) -> dict:
    """Choose the blended stage one's weights on valid (every valid user); stored in the export."""
    baselines = fit_baselines(cfg, data.catalog, *train_pairs(examples["train"]))
    found = two_stage.fit_blend(cfg, data.catalog, examples["valid"], baselines, retriever_dir)
    print(f"[shoprank] blend weights (chosen on {found['chosen_on']}): {found['weights']}")
    columns = [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")]
    print_table(found["valid"], columns)
    return found


def search_report(
    cfg: Config,
    out: Path,
    data: Validated,
    examples: dict[str, ray.data.Dataset],
    model_dir: str | None,
    history: list[dict],
) -> tuple[dict[str, dict[str, float]], Path]:
    """NDCG@10 over the judgments file: zero-shot vs fine-tuned vs baselines."""
    if data.judgments is None:
        raise ValueError(
            f"data.task=search is evaluated on judgments, but data.judgments={cfg.data.judgments!r}"
            " does not exist; point it at a judgments Parquet (jobs/prepare.py esci|wands)"
        )
    baselines = fit_baselines(cfg, data.catalog, *train_pairs(examples["train"]))
    table = search.evaluate_judgments(cfg, data.catalog, data.judgments, model_dir, baselines)
    folder = out / "report_search"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(table, indent=2))
    images = {"NDCG@10 by model": report.bar_chart(table, ["ndcg@10"], folder / "metrics.png")}
    if history:
        images["Training"] = training_curve(history, ["val_ndcg@10"], folder / "training.png")
    n_queries = int(next(iter(table.values()))["queries"]) if table else 0
    protocol = (
        f"{data.judgments.num_rows} judged (query, item) pairs over {n_queries} queries with a "
        "positive gain; each query's judged items ordered by the model's score, NDCG@10 with "
        "the judged gains (tied scores share their gains)."
    )
    sections = [
        ("Results", report.metrics_table(table, ["ndcg@10"])),
        ("Protocol", protocol),
        ("Data quality", counts_table(data.counts)),
    ]
    path = report.write_report(folder, f"shoprank search: {cfg.run.name}", sections, images)
    print_table(table, ["ndcg@10"])
    return table, path
