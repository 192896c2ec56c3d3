"""Full-catalog evaluation of the two stages: retrieve N from every item, then rerank them.

Protocol (data/amazon-scientific/README.md): each user's held-out item is ranked among ALL
catalog items, ties against the model, history not removed; Recall@k and NDCG@k averaged over
all users. Baselines and the zero-shot encoder score the whole catalog exactly; the fine-tuned
retriever goes through its ANN index (top N), and the ranker reorders those N.

A target outside the top N is a miss at every k <= N whatever the ranker does, so stage two
only scores the users whose target was retrieved: the metrics still cover every user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from shoprank import metrics
from shoprank.baselines import Popularity, TfidfHistory
from shoprank.config import Config
from shoprank.data.text import history_context, render_items
from shoprank.data.tokenize import KEY, tokenize
from shoprank.evaluation import CrossEncoderScorer, collect_scores
from shoprank.models.encoder import read_metadata
from shoprank.retrieval import Contexts, EncoderSpec, embed_catalog, embed_contexts, ensure_index

# Users per block when a full [users, catalog] score matrix is ranked.
_CHUNK = 1024

ZERO_SHOT = "zero-shot retriever"
RETRIEVER = "fine-tuned retriever"
TWO_STAGE = "fine-tuned retriever + ranker"


@dataclass
class Outcome:
    ranks: dict[str, np.ndarray] = field(default_factory=dict)  # model -> rank per user
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def table(self, ks: list[int]) -> dict[str, dict[str, float]]:
        return {name: metrics.ranking_metrics(r, ks) for name, r in self.ranks.items()}


def exact_ranks(contexts: np.ndarray, items: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Ranks by exact inner product against the whole catalog, a block of users at a time."""
    return np.concatenate(
        [
            metrics.target_ranks(contexts[s : s + _CHUNK] @ items.T, target[s : s + _CHUNK])
            for s in range(0, len(target), _CHUNK)
        ]
    )


def baseline_ranks(
    baselines: dict, histories: list[list[str]], target: np.ndarray
) -> dict[str, np.ndarray]:
    out = {}
    for name, fitted in baselines.items():
        if isinstance(fitted, Popularity):
            out[name] = metrics.target_ranks(fitted.score_catalog(len(target)), target)
        elif isinstance(fitted, TfidfHistory):
            blocks = fitted.score_catalog_chunks(histories, chunk=_CHUNK)
            out[name] = np.concatenate(
                [
                    metrics.target_ranks(block, target[i * _CHUNK : i * _CHUNK + len(block)])
                    for i, block in enumerate(blocks)
                ]
            )
    return out


def rerank(
    cfg: Config,
    ranker_dir: str,
    contexts: Contexts,
    candidates: np.ndarray,
    stage_one: np.ndarray,
    catalog: pa.Table,
) -> tuple[np.ndarray, int]:
    """Final ranks after the cross-encoder reorders the top `rerank_top` candidates.

    Only users whose target sits in that block are scored (the others keep their stage-one
    rank, which is >= the block size); returns the ranks and the number of users scored.
    """
    m = min(cfg.eval.rerank_top or candidates.shape[1], candidates.shape[1])
    final = stage_one.copy()
    users = np.flatnonzero(stage_one < m)
    if not len(users):
        return final, 0
    # The ranker reads contexts the way it was trained: its own template and history length.
    rcfg = Config.model_validate(read_metadata(ranker_dir)["config"])
    texts = np.array(render_items(catalog, rcfg.data.item_template), dtype=object)
    text_of = dict(zip(catalog["item_id"].to_pylist(), texts, strict=True))
    block = candidates[users, :m]
    table = pa.table(
        {
            KEY: pa.array(users, pa.int64()),
            "context": [
                history_context(
                    [text_of[i] for i in contexts.history_ids[u][: rcfg.data.history_len]],
                    rcfg.data.history_separator,
                )
                for u in users
            ],
            "item_texts": [list(texts[row]) for row in block],
            "labels": [
                (row == contexts.target[u]).astype(np.float32).tolist()
                for u, row in zip(users, block, strict=True)
            ],
        }
    )
    groups = tokenize(ray.data.from_arrow(table), ranker_dir, rcfg.model.max_length)
    scores, labels, keys = collect_scores(
        groups,
        CrossEncoderScorer,
        {"model_dir": ranker_dir, "bf16": cfg.train.bf16},
        num_cpus=cfg.eval.num_cpus,
        batch_size=max(1, cfg.train.eval_batch_size // m),
    )
    # Every scored group holds its target once: the rank is its place in the reordered block.
    final[keys] = metrics.grouped_ranks(
        np.repeat(np.arange(len(scores)), m), labels.ravel(), scores.ravel()
    )
    return final, len(users)


def evaluate(
    cfg: Config,
    catalog: pa.Table,
    groups: ray.data.Dataset,
    baselines: dict,
    retriever_dir: str | None,
    ranker_dir: str | None,
) -> Outcome:
    """Ranks of every user's held-out item for baselines, zero-shot, retriever, two stages."""
    ids = catalog["item_id"].to_pylist()
    out = Outcome()

    def timed(name: str, started: float) -> None:
        out.timings[name] = round(time.perf_counter() - started, 1)

    contexts = None
    if cfg.eval.zero_shot:
        started = time.perf_counter()
        spec = EncoderSpec.zero_shot(cfg)
        items, _ = embed_catalog(catalog, spec, cfg)
        contexts = embed_contexts(groups, spec, cfg, ids)
        out.ranks[ZERO_SHOT] = exact_ranks(contexts.embedding, items, contexts.target)
        timed(ZERO_SHOT, started)

    if retriever_dir:
        started = time.perf_counter()
        index, status = ensure_index(retriever_dir, catalog, cfg)
        out.notes.append(
            f"Index: {index.info['params']} over {index.info['n_items']} items ({status}); "
            f"catalog embedded at {index.info.get('items_per_s', '?')} items/s, "
            f"index built in {index.info['build_s']} s."
        )
        contexts = embed_contexts(groups, EncoderSpec.from_export(retriever_dir), cfg, ids)
        scores, candidates = index.search(contexts.embedding, cfg.eval.retrieve_top)
        stage_one = metrics.candidate_ranks(candidates, scores, contexts.target, len(ids))
        out.ranks[RETRIEVER] = stage_one
        timed(RETRIEVER, started)
        if ranker_dir:
            started = time.perf_counter()
            out.ranks[TWO_STAGE], n = rerank(
                cfg, ranker_dir, contexts, candidates, stage_one, catalog
            )
            timed(TWO_STAGE, started)
            m = min(cfg.eval.rerank_top or cfg.eval.retrieve_top, cfg.eval.retrieve_top)
            out.notes.append(
                f"Stage two: the ranker reordered the top {m} of {n} users whose target was "
                f"among them ({n * m} pairs in {out.timings[TWO_STAGE]} s); the other users "
                "keep their stage-one rank (a miss stays a miss)."
            )

    if contexts is None:
        raise ValueError("full-catalog evaluation needs eval.zero_shot or a retriever")
    started = time.perf_counter()
    out.ranks.update(baseline_ranks(baselines, contexts.history_ids, contexts.target))
    timed("baselines", started)
    # Baselines first, as in every report.
    models = (ZERO_SHOT, RETRIEVER, TWO_STAGE)
    order = [n for n in out.ranks if n not in models] + [n for n in models if n in out.ranks]
    out.ranks = {n: out.ranks[n] for n in order}
    return out
