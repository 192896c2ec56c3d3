"""What each part of stage one buys, every choice made on valid and every figure on test.

A system is one encoder's signals (retrieval/blend.py) with blend weights searched on the valid
users and a fusion model fitted on them (retrieval/fusion.py), applied to every test user: the
procedure jobs/blend.py ships. The ablation refits that procedure without each signal in turn
and on the zero-shot encoder, so each row answers "what if this part were missing" under the
same protocol as the full system.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from shoprank.evaluation import metrics
from shoprank.evaluation.full_catalog import RankerBlock, block_ranks
from shoprank.retrieval import blend, fusion
from shoprank.retrieval.embed import Contexts
from shoprank.retrieval.fusion import Fusion, Pairs
from shoprank.retrieval.fusion import fit_for as fit_fusion


@dataclass
class Signals:
    """One encoder's standardised signals for one split's users, and what they came from."""

    contexts: Contexts
    signals: dict[str, np.ndarray]
    rows: list[list[int]]  # each user's history as catalog rows, newest first
    pairs: Pairs | None = None  # the fusion's candidate-to-history inputs


def split_signals(
    contexts: Contexts, items: np.ndarray, ids: list[str], baselines: dict, decay: float
) -> Signals:
    """Every signal of `blend.signals` for these users, over this encoder's item vectors."""
    row = {item: j for j, item in enumerate(ids)}
    histories = [[i for i in h if i in row] for h in contexts.history_ids]
    signals = blend.signals(contexts.embedding, histories, items, ids, baselines, decay)
    rows = [[row[i] for i in h] for h in histories]
    return Signals(contexts, signals, rows, blend.pairs(items, baselines))


@dataclass
class System:
    weights: dict[str, float]
    fusion: Fusion | None
    valid: dict[str, dict[str, float]]  # blend, and fusion cross-fitted
    test: dict[str, dict[str, float]]  # blend, fused
    notes: dict = field(default_factory=dict)


def fit_system(
    cfg,
    valid: Signals,
    test: Signals,
    keep: list[str],
    weights: dict[str, float] | None = None,
    pairs: bool = True,
) -> System:
    """Blend weights and fusion over the signals in `keep`, chosen on valid, scored on test.

    `weights` reuses a search already made over the same signals; `pairs=False` fits the
    fusion without its candidate-to-history features."""
    v = {k: valid.signals[k] for k in keep}
    t = {k: test.signals[k] for k in keep}
    target_v, target_t = valid.contexts.target, test.contexts.target
    if weights is None:
        weights, _ = blend.search_weights(
            v, target_v, cfg.eval.blend_trials, cfg.train.metric, cfg.run.seed
        )
    blended_v, blended_t = blend.blend(v, weights), blend.blend(t, weights)
    ks = cfg.eval.ks
    system = System(
        weights,
        None,
        {"blend": metrics.ranking_metrics(metrics.target_ranks(blended_v, target_v), ks)},
        {"blend": metrics.ranking_metrics(metrics.target_ranks(blended_t, target_t), ks)},
    )
    if not cfg.eval.fusion_top:
        return system
    pairs_v, pairs_t = (valid.pairs, test.pairs) if pairs else (None, None)
    model, details = fit_fusion(cfg, v, blended_v, valid.rows, target_v, pairs_v)
    fused_t = model.scores(t, blended_t, test.rows, pairs_t)
    system.fusion = model
    system.valid["fused"] = details["cross_fitted"][f"fusion, {details['rounds']} rounds"]
    system.test["fused"] = metrics.ranking_metrics(metrics.target_ranks(fused_t, target_t), ks)
    system.notes = {
        "rounds": details["rounds"],
        "feature_gain": details["feature_gain"],
        "pairs": pairs,
    }
    return system


def valid_value(system: System, cfg) -> float:
    """The system's valid figure of `train.metric`: the fusion's cross-fitted one when it has
    a fusion, else the blend's (on the users its weights were chosen on)."""
    return system.valid.get("fused", system.valid["blend"])[cfg.train.metric]


def _blended(system: System, split: Signals) -> tuple[dict[str, np.ndarray], np.ndarray]:
    s = {k: split.signals[k] for k in system.weights}
    return s, blend.blend(s, system.weights)


def final_scores(system: System, split: Signals) -> np.ndarray:
    """The system's stage-one scores [users, items] for a split's users."""
    s, blended = _blended(system, split)
    if system.fusion is None:
        return blended
    return system.fusion.scores(s, blended, split.rows, split.pairs)


def cross_fitted_scores(cfg, system: System, split: Signals) -> np.ndarray:
    """`final_scores` for the users the system was fitted on (valid), each user's from the
    fusion fold that did not see them, as unseen users get them (the blend's weights stay those
    chosen on all of them)."""
    s, blended = _blended(system, split)
    if system.fusion is None:
        return blended
    target = split.contexts.target
    return system.fusion.cross_fitted_scores(cfg, s, blended, split.rows, target, split.pairs)


def rerank_features(block: RankerBlock) -> np.ndarray:
    """[n, m, 5] per candidate of the block: stage one's and the ranker's scores standardised
    within it, their ranks in it, and the ranker's raw score (comparable across users)."""
    s1, s2 = blend.standardize(block.stage_one), blend.standardize(block.scores)

    columns = (
        s1,
        fusion.row_ranks(block.stage_one),
        s2,
        fusion.row_ranks(block.scores),
        block.scores,
    )
    return np.stack([np.asarray(c, dtype=np.float32) for c in columns], axis=2)


def fit_rerank_fusion(
    cfg, valid: RankerBlock, valid_ranks: np.ndarray, test: RankerBlock, test_ranks: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Stage two as a LambdaMART model over stage one's and the ranker's scores of the block,
    instead of one fixed mix: it may trust the ranker where stage one is unsure. Rounds chosen
    by cross-fitting on the valid users, the model fitted on all of them, applied to test.
    Returns every valid user's cross-fitted rank, every test user's rank, and the rounds."""
    x, y = rerank_features(valid), valid.labels > 0
    params = fusion.params_for(cfg)
    rounds = cfg.eval.fusion_rounds
    by_rounds = {
        r: block_ranks(valid, pred, valid_ranks)
        for r, pred in fusion.cross_fit(
            x, y, rounds, cfg.eval.fusion_folds, params, cfg.run.seed
        ).items()
    }
    metric = cfg.train.metric

    def value(r: int) -> float:
        return metrics.ranking_metrics(by_rounds[r], cfg.eval.ks)[metric]

    best = max(rounds, key=value)
    model = fusion.train_booster(x, y, np.arange(len(y)), best, params)
    if not len(test.users):
        return by_rounds[best], test_ranks.copy(), best
    xt = rerank_features(test)
    pred = model.predict(xt.reshape(-1, xt.shape[2])).reshape(xt.shape[:2])
    return by_rounds[best], block_ranks(test, pred, test_ranks), best
