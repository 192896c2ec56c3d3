"""Full-catalog evaluation of the two stages: retrieve N from every item, then rerank them.

Protocol (docs/DESIGN.md, "Evaluation protocols"): each user's held-out item is ranked among ALL
catalog items, ties against the model, history not removed; Recall@k and NDCG@k averaged over
all users. Baselines and the zero-shot encoder score the whole catalog exactly; the fine-tuned
retriever goes through its ANN index (top N); the blended stage one (retrieval/blend.py, when the
retriever export holds blend.json) scores the catalog exactly, and the ranker reorders the top N
of whichever stage one came last.

A target outside the top N is a miss at every k <= N whatever the ranker does, so stage two
only scores the users whose target was retrieved: the metrics still cover every user.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from shoprank.config import Config
from shoprank.console import log
from shoprank.data.load import counts_table
from shoprank.data.text import history_texts, render_context, render_items
from shoprank.data.tokenize import KEY
from shoprank.evaluation import metrics, report
from shoprank.evaluation.baselines import CoVisitation, Popularity, TfidfHistory
from shoprank.evaluation.scorers import (
    CrossEncoderScorer,
    collect_scores,
    precision_words,
    ranker_settings,
)
from shoprank.models.export_meta import read_export
from shoprank.models.retriever import EncoderSpec
from shoprank.retrieval import rerank
from shoprank.retrieval.embed import Contexts, embed_catalog, embed_contexts, ensure_index
from shoprank.retrieval.stage_one import for_evaluation
from shoprank.run import Run

# Users per block when a full [users, catalog] score matrix is ranked.
_CHUNK = 1024

ZERO_SHOT = "zero-shot retriever"
RETRIEVER = "fine-tuned retriever"
BLEND = "blended stage one"
TWO_STAGE = "fine-tuned retriever + ranker"
BLEND_TWO_STAGE = "blended stage one + ranker"
FUSED = "fused stage one"
FUSED_TWO_STAGE = "fused stage one + ranker"
PRIMARY = "ndcg@10"


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
        elif isinstance(fitted, (TfidfHistory, CoVisitation)):
            blocks = fitted.score_catalog_chunks(histories, chunk=_CHUNK)
            out[name] = np.concatenate(
                [
                    metrics.target_ranks(block, target[i * _CHUNK : i * _CHUNK + len(block)])
                    for i, block in enumerate(blocks)
                ]
            )
    return out


@dataclass
class RankerBlock:
    """The cross-encoder's scores of the top `m` stage-one candidates, for the users whose
    target sits among them (the others' ranks cannot change by reordering the block)."""

    users: np.ndarray  # [n] indices into the split's users
    scores: np.ndarray  # [n, m] ranker scores, stage one's order
    labels: np.ndarray  # [n, m] 1 at the target
    stage_one: np.ndarray  # [n, m] stage-one scores of the same candidates


def ranker_block(
    cfg: Config,
    ranker_dir: str,
    contexts: Contexts,
    candidates: np.ndarray,
    candidate_scores: np.ndarray,
    stage_one: np.ndarray,
    catalog: pa.Table,
) -> RankerBlock:
    """Score the top `eval.rerank_top` candidates of every user whose target is among them."""
    m = min(cfg.eval.rerank_top or candidates.shape[1], candidates.shape[1])
    users = np.flatnonzero(stage_one < m)
    if not len(users):
        empty = np.zeros((0, m), np.float32)
        return RankerBlock(users, empty, empty, empty)
    # The ranker reads contexts the way it was trained: its own template and history length.
    rcfg = read_export(ranker_dir, kind="ranker").config
    rendered = render_items(catalog, rcfg.data.item_template)
    texts = np.array(rendered, dtype=object)
    text_of = history_texts(catalog, rcfg.data, rendered)
    block = candidates[users, :m]
    table = pa.table(
        {
            KEY: pa.array(users, pa.int64()),
            "context": [render_context(contexts.history_ids[u], text_of, rcfg.data) for u in users],
            "item_texts": [list(texts[row]) for row in block],
            "labels": [
                (row == contexts.target[u]).astype(np.float32).tolist()
                for u, row in zip(users, block, strict=True)
            ],
        }
    )
    scores, labels, keys = collect_scores(
        ray.data.from_arrow(table),
        CrossEncoderScorer,
        ranker_settings(cfg, ranker_dir),
        num_cpus=cfg.eval.num_cpus,
        batch_size=max(1, cfg.train.eval_batch_size // m),
        in_process_below=cfg.eval.score_in_process_below,
    )
    return RankerBlock(keys, scores, labels, candidate_scores[keys, :m])


def block_ranks(block: RankerBlock, order_scores: np.ndarray, stage_one: np.ndarray) -> np.ndarray:
    """Every user's final rank once `order_scores` [n, m] reorders the block's users' top m;
    the other users keep their stage-one rank (>= m)."""
    final = stage_one.copy()
    n, m = block.scores.shape
    final[block.users] = metrics.grouped_ranks(
        np.repeat(np.arange(n), m), block.labels.ravel(), order_scores.ravel()
    )
    return final


def mixed_ranks(cfg: Config, block: RankerBlock, stage_one: np.ndarray) -> dict[float, np.ndarray]:
    """Final ranks after the cross-encoder reorders the block, for every mix in
    `eval.rerank_mix`: the order ``(1 - mix) * z(stage-one score) + mix * z(ranker score)``,
    both standardised within each user's block (1 = the ranker alone). Users outside the block
    keep their stage-one rank, which is >= the block size."""
    return {
        mix: block_ranks(block, rerank.mixed(block.stage_one, block.scores, mix), stage_one)
        for mix in cfg.eval.rerank_mix
    }


def rank_all(
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
        log(f"{name}: every user ranked over the catalog ({out.timings[name]} s)")

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
        stage = for_evaluation(
            retriever_dir, catalog, baselines, cfg.eval.history_decay, cfg.eval.blend_weights
        )
        weights = stage.weights
        if weights:
            started = time.perf_counter()
            # The fusion was fitted on valid users: there each user gets a model without them.
            held_out = (cfg, contexts.target) if cfg.eval.split == "valid" else None
            by_stage = stage.stage_scores(contexts.embedding, contexts.history_ids, held_out)
            for name, scored in ((BLEND, by_stage["blend"]), (FUSED, by_stage.get("fused"))):
                if scored is not None:
                    stage_one = out.ranks[name] = metrics.target_ranks(scored, contexts.target)
            last = by_stage.get("fused", by_stage["blend"])  # what stage two reorders
            candidates = metrics.top_n(last, cfg.eval.retrieve_top)
            scores = np.take_along_axis(last, candidates, axis=1)
            timed(FUSED if stage.fusion else BLEND, started)
            out.notes.append(
                f"Blended stage one (retrieval/blend.py): standardised signals weighted "
                f"{weights}, exact over the catalog."
            )
            if stage.fusion:
                out.notes.append(
                    f"Fused stage one (retrieval/fusion.py): a LightGBM LambdaMART model "
                    f"reorders the blend's top {stage.fusion.top} by the same signals, the "
                    "history position and length."
                    + (
                        f" On valid, where it was fitted, each user is scored by one of "
                        f"{cfg.eval.fusion_folds} models fitted without them (cross-fitted), "
                        "as unseen users are."
                        if held_out
                        else ""
                    )
                )
            out.notes.append(f"The last stage one's top {cfg.eval.retrieve_top} go to stage two.")
        if ranker_dir:
            started = time.perf_counter()
            name = (FUSED_TWO_STAGE if stage.fusion else BLEND_TWO_STAGE) if weights else TWO_STAGE
            block = ranker_block(cfg, ranker_dir, contexts, candidates, scores, stage_one, catalog)
            n = len(block.users)
            for mix, ranks in mixed_ranks(cfg, block, stage_one).items():
                out.ranks[name if mix == 1 else f"{name} (mix {mix:g})"] = ranks
            timed(name, started)
            m = min(cfg.eval.rerank_top or cfg.eval.retrieve_top, cfg.eval.retrieve_top)
            out.notes.append(
                f"Stage two: the ranker reordered the top {m} of {n} users whose target was "
                f"among them ({n * m} pairs in {out.timings[name]} s); the other users "
                "keep their stage-one rank (a miss stays a miss). Mix w: the order is "
                "(1 - w) z(stage one) + w z(ranker), standardised per user; w = 1 (no suffix) "
                "is the ranker alone."
            )

    if contexts is None:
        raise ValueError("full-catalog evaluation needs eval.zero_shot or a retriever")
    started = time.perf_counter()
    out.ranks.update(baseline_ranks(baselines, contexts.history_ids, contexts.target))
    timed("baselines", started)
    # Baselines first, as in every report.
    models = (ZERO_SHOT, RETRIEVER, TWO_STAGE, BLEND, BLEND_TWO_STAGE, FUSED)

    def stage(name: str) -> int:  # baselines first, then the stages in order
        return max((i + 1 for i, m in enumerate(models) if name.startswith(m)), default=0)

    order = sorted(out.ranks, key=stage)  # stable: mixes stay in config order
    out.ranks = {n: out.ranks[n] for n in order}
    return out


def evaluate(
    run: Run, retriever_dir: str | None, ranker_dir: str | None
) -> tuple[dict[str, dict[str, float]], str]:
    """Stage one and two on `eval.split` by the full-catalog protocol; report with plots."""
    cfg, catalog, split = run.cfg, run.data.catalog, run.cfg.eval.split
    outcome = rank_all(cfg, catalog, run.examples[split], run.baselines, retriever_dir, ranker_dir)
    table = outcome.table(cfg.eval.ks)
    if ranker_dir and retriever_dir and split == "valid":  # every choice is made on valid
        users = len(next(iter(outcome.ranks.values())))
        decision = choose_rerank(cfg, table, ranker_dir, f"valid, {users} users")
        rerank.save(retriever_dir, decision)
        outcome.notes.append(f"Recorded in {retriever_dir}/{rerank.FILE}: {decision.summary()}.")
        log(f"{rerank.FILE}: {decision.summary()}")
    columns = [f"{m}@{k}" for k in cfg.eval.ks for m in ("recall", "ndcg")]
    folder = run.out / f"report_{split}"
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
            f"full catalog ({catalog.num_rows} items)",
            folder / "recall_at_k.png",
        ),
    }
    if run.history or run.steps:
        images["Training"] = report.training_curve(
            run.history, run.steps, ["val_ndcg@10", "val_recall@10"], folder / "training.png"
        )
    users = len(next(iter(outcome.ranks.values())))
    protocol = (
        f"{users} {split} users; each held-out item ranked among all "
        f"{catalog.num_rows} catalog items (history not removed, ties count against the "
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
        ("Data quality", counts_table(run.data.counts)),
        ("Training time", report.training_time(run.timing, run.steps) or "–"),
    ]
    title = f"shoprank retrieval: {cfg.run.name} ({split}, full catalog)"
    path = report.write_report(folder, title, sections, images, precision_words(cfg))
    report.print_table(table, columns)
    return table, str(path)


def choose_rerank(
    cfg: Config, table: dict[str, dict[str, float]], ranker_dir: str, chosen_on: str
) -> rerank.RerankDecision:
    """The best `eval.rerank_mix` on this table against stage one alone, by the primary metric."""
    if FUSED in table:
        first, second = FUSED, FUSED_TWO_STAGE
    else:
        first, second = (BLEND, BLEND_TWO_STAGE) if BLEND in table else (RETRIEVER, TWO_STAGE)
    by_mix = {
        mix: table[second if mix == 1 else f"{second} (mix {mix:g})"][PRIMARY]
        for mix in cfg.eval.rerank_mix
    }
    mix = max(by_mix, key=lambda w: (by_mix[w], -w))  # ties: the lighter touch
    return rerank.RerankDecision(
        ranker_weights=rerank.weights_digest(ranker_dir),
        rerank_top=min(cfg.eval.rerank_top or cfg.eval.retrieve_top, cfg.eval.retrieve_top),
        mix=mix,
        metric=PRIMARY,
        stage_one=table[first][PRIMARY],
        two_stage=by_mix[mix],
        chosen_on=chosen_on,
    )
