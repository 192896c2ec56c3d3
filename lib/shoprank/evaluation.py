"""Evaluation: score held-out groups with each model via Ray Data batch inference.

Every scorer is a callable class for `map_batches` (the model loads once per actor) that adds a
[G] `scores` column to each group; metrics then come from the one metrics module.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray
import torch

from shoprank import metrics
from shoprank.baselines import CoVisitation, Popularity, TfidfHistory
from shoprank.config import Config, ModelConfig
from shoprank.data.text import render_items
from shoprank.data.tokenize import KEY
from shoprank.models.encoder import embed_texts, load_encoder, load_tokenizer
from shoprank.models.ranker import flatten_groups, load_for_inference


def _scored(batch: dict[str, np.ndarray], scores: np.ndarray) -> dict[str, np.ndarray]:
    out = {"labels": batch["labels"], "scores": scores}
    if KEY in batch:
        out[KEY] = batch[KEY]
    return out


class CrossEncoderScorer:
    """A fine-tuned ranker exported as a plain Hugging Face folder."""

    def __init__(self, model_dir: str, precision: str):
        self.model = load_for_inference(model_dir, precision)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {k: torch.from_numpy(v) for k, v in batch.items() if v.dtype == np.int32}
        b, g = batch["labels"].shape
        logits = self.model(**flatten_groups(tensors)).logits
        return _scored(batch, logits.float().view(b, g).numpy())


class ZeroShotScorer:
    """The pretrained encoder with no training: cosine of mean-pooled context and item.

    Item embeddings are computed once per actor for the whole catalog, then looked up.
    """

    def __init__(self, model: ModelConfig, item_ids: list[str], item_texts: list[str], bf16: bool):
        self.encoder = load_encoder(model).eval()
        self.tokenizer = load_tokenizer(model.name)
        self.max_length = model.max_length
        self.bf16 = bf16
        self.index = {item: i for i, item in enumerate(item_ids)}
        self.items = self._embed(item_texts)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return embed_texts(self.encoder, self.tokenizer, texts, self.max_length, bf16=self.bf16)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx = self._embed(list(batch["context"]))
        rows = np.array([[self.index[i] for i in ids] for ids in batch["item_ids"]])
        scores = np.einsum("bd,bgd->bg", ctx, self.items[rows])
        return _scored(batch, scores)


class BaselineScorer:
    """Popularity, TF-IDF or co-visitation of the history, on the same candidate groups."""

    def __init__(self, baseline: Popularity | TfidfHistory | CoVisitation):
        self.baseline = baseline

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [list(ids) for ids in batch["item_ids"]]
        if isinstance(self.baseline, Popularity):
            scores = np.stack([self.baseline.score(ids) for ids in items])
        else:
            histories = [list(h) for h in batch["history_ids"]]
            scores = np.stack(self.baseline.score_pairs(histories, items))
        return _scored(batch, scores.astype(np.float32))


def collect_scores(
    ds: ray.data.Dataset, scorer, kwargs: dict, num_cpus: float = 1, batch_size: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run a scorer over every group: (scores, labels), both [n_groups, G], and the groups'
    `key` column when they carry one (Ray Data does not promise to keep row order)."""
    scored = ds.map_batches(
        scorer,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=1,
        num_cpus=num_cpus,  # Ray sets the actor's torch threads to this
    )
    scores, labels, keys = [], [], []
    for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
        scores.append(batch["scores"])
        labels.append(batch["labels"])
        if KEY in batch:
            keys.append(batch[KEY])
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(keys) if keys else None


def group_metrics(scores: np.ndarray, labels: np.ndarray, probabilistic: bool) -> dict[str, float]:
    """AUC, NDCG@10, Recall@10 (and logloss when scores are logits of a probability)."""
    groups = np.repeat(np.arange(len(scores)), scores.shape[1])
    out = metrics.pointwise_and_ranking(groups, labels.ravel(), scores.ravel(), ks=(10,))
    if not probabilistic:
        out["logloss"] = float("nan")
    return out


def fit_baselines(cfg: Config, catalog, positives: list[str], histories: list[list[str]]) -> dict:
    """Baselines fitted on the training part only: each training group's positive item and
    the history before it (`pipeline.train_pairs`)."""
    fitted: dict = {}
    ids = catalog["item_id"].to_pylist()
    if "popularity" in cfg.eval.baselines:
        fitted["popularity"] = Popularity().fit(positives, catalog=ids)
    if "tfidf" in cfg.eval.baselines:
        fitted["tfidf"] = TfidfHistory(decay=cfg.eval.history_decay).fit(
            ids, render_items(catalog, cfg.data.item_template)
        )
    if "covisit" in cfg.eval.baselines:
        fitted["co-visitation"] = CoVisitation(cfg.eval.covisit_window, cfg.eval.history_decay).fit(
            ids, histories, positives
        )
    return fitted


def ranker_precision(cfg: Config) -> str:
    """eval.ranker_precision, else bf16 weights when the run uses bf16 (DESIGN.md: the fastest
    batch scoring), else fp32."""
    return cfg.eval.ranker_precision or ("bf16" if cfg.train.bf16 else "fp32")


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
    runs["fine-tuned ranker"] = (
        CrossEncoderScorer,
        {"model_dir": model_dir, "precision": ranker_precision(cfg)},
    )
    for name, fitted in baselines.items():
        runs[name] = (BaselineScorer, {"baseline": fitted})
    table, raw = {}, {}
    for name, (scorer, kwargs) in runs.items():
        scores, labels, _ = collect_scores(groups, scorer, kwargs, num_cpus=cfg.eval.num_cpus)
        raw[name] = (scores, labels)
        table[name] = group_metrics(scores, labels, probabilistic=scorer is CrossEncoderScorer)
    return table, raw
