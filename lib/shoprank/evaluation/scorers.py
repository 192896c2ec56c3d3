"""Evaluation: score held-out groups with each model via Ray Data batch inference (small
evaluations in the calling process).

Every scorer is a callable class for `map_batches` (the model loads once per actor) that adds a
[G] `scores` column to each group; metrics then come from the one metrics module.
"""

from __future__ import annotations

import numpy as np
import ray

from shoprank import console  # noqa: F401  (Ray Data actors: foreign warnings filtered)
from shoprank.config import Config, ModelConfig
from shoprank.data.tokenize import KEY
from shoprank.evaluation.baselines import CoVisitation, Popularity, TfidfHistory
from shoprank.models.ranker import Ranker
from shoprank.models.retriever import EncoderSpec
from shoprank.precision import ranker_backend


def _scored(batch: dict[str, np.ndarray], scores: np.ndarray) -> dict[str, np.ndarray]:
    out = {"labels": batch["labels"], "scores": scores}
    if KEY in batch:
        out[KEY] = batch[KEY]
    return out


class CrossEncoderScorer:
    """Ray Data actor around the one ranker inference class (`models.ranker.Ranker`): groups'
    texts in, scores out. Tokenizing here rather than in a pool of its own keeps one pool on
    the cores (a 2-core machine cannot run both at once), and `Ranker.score` sorts the batch's
    pairs by length so that short ones do not pay for long ones' padding."""

    def __init__(self, model_dir: str, precision: str, max_length: int | None = None):
        self.ranker = Ranker.from_export(model_dir, precision, max_length=max_length)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sizes = {len(items) for items in batch["item_texts"]}
        if len(sizes) != 1:
            raise ValueError(f"groups of unequal size in one batch: {sorted(sizes)}")
        g = sizes.pop()
        contexts = [str(c) for c in batch["context"] for _ in range(g)]
        items = [str(t) for texts in batch["item_texts"] for t in texts]
        scores = self.ranker.score(contexts, items).reshape(len(batch["context"]), g)
        return _scored(batch, scores)


class ZeroShotScorer:
    """The pretrained encoder with no training: cosine of mean-pooled context and item.

    Item embeddings are computed once per actor for the whole catalog, then looked up.
    """

    def __init__(self, model: ModelConfig, item_ids: list[str], item_texts: list[str], bf16: bool):
        spec = EncoderSpec(
            model.name, "mean", model.max_length, model.max_length, model.attn_implementation
        )
        self.encoder = spec.load(bf16)
        self.index = {item: i for i, item in enumerate(item_ids)}
        self.items = self.encoder.embed(item_texts, "item")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx = self.encoder.embed([str(c) for c in batch["context"]], "context")
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
    ds: ray.data.Dataset,
    scorer,
    kwargs: dict,
    num_cpus: float = 1,
    batch_size: int = 4,
    in_process_below: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Run a scorer over every group: (scores, labels), both [n_groups, G], and the groups'
    `key` column when they carry one (Ray Data does not promise to keep row order).

    Up to `in_process_below` pairs are scored in this process (eval.score_in_process_below):
    an actor is a new process that imports torch and loads the model again, which costs more
    than scoring a few thousand pairs. Callers pass materialised datasets: the count and the
    first row are then read, not computed."""
    if in_process_below and (n := ds.count()) <= in_process_below:
        first = ds.take(1)  # every group of one evaluation holds as many pairs
        if not first or n * len(first[0]["labels"]) <= in_process_below:
            fn = scorer(**kwargs)
            batches = ds.iter_batches(batch_size=batch_size, batch_format="numpy")
            return _joined(fn(batch) for batch in batches)
    scored = ds.map_batches(
        scorer,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=num_cpus,  # Ray sets the actor's torch threads to this
    )
    return _joined(scored.iter_batches(batch_format="numpy", batch_size=None))


def _matrix(rows) -> np.ndarray:
    """[groups, G] float32, from a 2-D array, a list of lists or an array of arrays."""
    a = np.asarray(rows)
    if a.dtype == object:
        a = np.stack([np.asarray(r) for r in a])
    return a.astype(np.float32, copy=False)


def _joined(batches) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    scores, labels, keys = [], [], []
    for batch in batches:
        scores.append(_matrix(batch["scores"]))
        labels.append(_matrix(batch["labels"]))
        if KEY in batch:
            keys.append(np.asarray(batch[KEY]))
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(keys) if keys else None


def ranker_settings(cfg: Config, model_dir: str) -> dict:
    """CrossEncoderScorer's arguments: the ranker at the precision and pair length asked for."""
    return {
        "model_dir": model_dir,
        "precision": ranker_precision(cfg),
        "max_length": cfg.eval.ranker_max_length,
    }


def ranker_precision(cfg: Config) -> str:
    """eval.ranker_precision, else train.precision, resolved on this host as the Serve app
    resolves its own (auto: bf16 weights where bf16 is native, else ONNX Runtime fp32)."""
    return ranker_backend(cfg.eval.ranker_precision or cfg.train.precision)


def precision_words(cfg: Config) -> str:
    """The precisions an evaluation computes in, for its report."""
    encoder = "bf16" if cfg.train.bf16 else "fp32"
    ranker = ranker_precision(cfg)
    return f"encoders {encoder} (train.precision {cfg.train.precision}), ranker {ranker}"
