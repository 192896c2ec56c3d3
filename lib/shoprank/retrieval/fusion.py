"""Stage one's final order: LambdaMART (LightGBM) over the blend's top N candidates.

The blend is one weighted sum of z-scored signals. What it cannot express, a tree ensemble
learns from the same signals: whether a candidate is an item the user already has and how
recently (on Amazon the blend gives many of its top slots to items the user already has, while
the held-out item is rarely one of them: RESULTS.md), how the signals agree, how long the
history is. The model reorders the blend's top `eval.fusion_top`; everything below keeps the
blend's order.

It is fitted on the valid users' held-out items, where the blend weights are chosen too, so test
stays untouched. The number of boosting rounds is chosen by cross-fitting on valid (each user
scored by a model trained on the other folds): the valid figures it reports are those
cross-fitted ones. The model ships inside the retriever export (fusion.txt + fusion.json) and is
applied by `StageOne.scores`, the one path evaluation and the Serve app share.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import scipy.sparse as sp

from shoprank.evaluation import metrics

MODEL_FILE = "fusion.txt"
META_FILE = "fusion.json"
# history_position of an item the user does not have: further back than any history.
ABSENT = 1000.0
# Signals whose order within the candidates is a feature too (ranks carry what z-scores of
# skewed signals blur).
_RANKED = ("retriever", "history", "covisit", "tfidf")
# Candidate-to-history features (`Pairs`): the per-user signals sum over the whole history,
# these look at single items of it. Each belongs to the signal it refines and goes with it.
PAIR_FEATURES = {
    "last_similarity": "history",  # the encoder's cosine to the newest history item
    "best_similarity": "history",  # its highest cosine to one of the newest SIMILAR_TO items
    "covisit_last": "covisit",  # co-visitation count with the newest history item
}
SIMILAR_TO = 5
_USERS_PER_CHUNK = 512
# The boosted trees' shape and step: small trees, slow learning (`fit`'s defaults).
LEAVES = 15
LEARNING_RATE = 0.05


@dataclass
class Pairs:
    """What the candidate-to-history features are computed from: the encoder's unit-length
    item vectors (catalog rows, as its index holds them) and the co-visitation counts."""

    items: np.ndarray
    covisit: sp.csr_matrix | None = None


def pair_names(signal_names: Sequence[str], pairs: Pairs | None) -> list[str]:
    if pairs is None:
        return []
    have = set(signal_names) - ({"covisit"} if pairs.covisit is None else set())
    return [name for name, source in PAIR_FEATURES.items() if source in have]


def feature_names(signal_names: Sequence[str], pairs: Pairs | None = None) -> list[str]:
    ranked = [f"{s}_rank" for s in _RANKED if s in signal_names]
    return [
        *signal_names,
        *ranked,
        "blend",
        "blend_rank",
        "history_position",
        "history_length",
        *pair_names(signal_names, pairs),
    ]


def pair_columns(
    cand: np.ndarray, history_rows: Sequence[Sequence[int]], pairs: Pairs, names: list[str]
) -> list[np.ndarray]:
    """The `names` features of each candidate [U, N]; NaN where the user has no history."""
    users, n = cand.shape
    out = {name: np.full((users, n), np.nan, dtype=np.float32) for name in names}
    newest = np.full((users, SIMILAR_TO), -1)
    for u, rows in enumerate(history_rows):
        head = list(rows[:SIMILAR_TO])
        newest[u, : len(head)] = head
    for lo in range(0, users, _USERS_PER_CHUNK):
        hi = min(lo + _USERS_PER_CHUNK, users)
        c, last = cand[lo:hi], newest[lo:hi, 0]
        has = last >= 0
        if "last_similarity" in out or "best_similarity" in out:
            vectors = pairs.items[c]  # [chunk, N, D]
            sims = np.einsum("und,ukd->unk", vectors, pairs.items[np.maximum(newest[lo:hi], 0)])
            # An empty slot, or the candidate itself, is no evidence.
            void = (newest[lo:hi, None, :] < 0) | (newest[lo:hi, None, :] == c[:, :, None])
            if "last_similarity" in out:
                out["last_similarity"][lo:hi][has] = sims[has, :, 0]
            if "best_similarity" in out:
                best = np.where(void, -np.inf, sims).max(axis=2)
                out["best_similarity"][lo:hi] = np.where(np.isfinite(best), best, np.nan)
        if "covisit_last" in out and has.any():
            counts = pairs.covisit[last[has]].toarray()
            out["covisit_last"][lo:hi][has] = np.take_along_axis(counts, c[has], axis=1)
    return [out[name] for name in names]


def row_ranks(scores: np.ndarray) -> np.ndarray:
    """Each entry's place within its row, 0 for the highest score."""
    return np.argsort(np.argsort(-scores, axis=1), axis=1)


def features(
    signals: dict[str, np.ndarray],
    blended: np.ndarray,
    history_rows: Sequence[Sequence[int]],
    top: int,
    pairs: Pairs | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(candidates [U, N] best first by the blend, features [U, N, F], feature names).

    `signals` are the standardised [U, items] scores of `blend.signals`, `blended` their blend,
    `history_rows` each user's catalog rows, newest first; `pairs` adds the
    candidate-to-history features of the signals present."""
    cand = metrics.top_n(blended, top)
    users, n = cand.shape
    names = sorted(signals)
    cols = [np.take_along_axis(signals[s], cand, axis=1) for s in names]
    for s in _RANKED:
        if s in signals:
            cols.append(row_ranks(cols[names.index(s)]))
    cols.append(np.take_along_axis(blended, cand, axis=1))
    cols.append(np.broadcast_to(np.arange(n), (users, n)))
    position = np.full((users, n), ABSENT, dtype=np.float32)
    for u, rows in enumerate(history_rows):
        newest = {}
        for i, row in enumerate(rows):
            newest.setdefault(int(row), i)
        for j, r in enumerate(cand[u].tolist()):
            if r in newest:
                position[u, j] = newest[r]
    cols.append(position)
    lengths = np.array([len(h) for h in history_rows], dtype=np.float32)
    cols.append(np.broadcast_to(lengths[:, None], (users, n)))
    if pairs is not None:
        cols.extend(pair_columns(cand, history_rows, pairs, pair_names(names, pairs)))
    x = np.stack([np.asarray(c, dtype=np.float32) for c in cols], axis=2)
    return cand, x, feature_names(names, pairs)


def placed(blended: np.ndarray, cand: np.ndarray, fused: np.ndarray) -> np.ndarray:
    """[U, items]: the candidates in the model's order, above the rest in the blend's."""
    out = np.array(blended, dtype=np.float64)
    lift = out.max(axis=1, keepdims=True) + 1.0 - fused.min(axis=1, keepdims=True)
    np.put_along_axis(out, cand, fused + lift, axis=1)
    return out


@dataclass
class Fusion:
    booster: lgb.Booster
    top: int
    features: list[str]
    rounds: int  # boosting rounds, chosen by cross-fitting (`fit`)

    def scores(
        self,
        signals: dict[str, np.ndarray],
        blended: np.ndarray,
        history_rows: Sequence[Sequence[int]],
        pairs: Pairs | None = None,
    ) -> np.ndarray:
        """[U, items] scores: the blend's top N in the model's order, above the rest of the
        catalog in the blend's order. `pairs` is needed when the model was fitted with it."""
        cand, x = self._inputs(signals, blended, history_rows, pairs)
        users, n, f = x.shape
        fused = self.booster.predict(x.reshape(-1, f), num_threads=1).reshape(users, n)
        return placed(blended, cand, fused)

    def cross_fitted_scores(
        self,
        cfg,
        signals: dict[str, np.ndarray],
        blended: np.ndarray,
        history_rows: Sequence[Sequence[int]],
        target: np.ndarray,
        pairs: Pairs | None = None,
    ) -> np.ndarray:
        """`scores` for the users this model was fitted on (by `fit_for`), each user's from
        the model of its cross-fitting that did not see them (same folds and rounds): what a
        figure on these users, or a choice made after stage one on them (e.g. stage two's mix),
        must use. On other users than it was fitted on, it is still honest: each user's scores
        come from a model refitted on the others."""
        cand, x = self._inputs(signals, blended, history_rows, pairs)
        y = cand == np.asarray(target)[:, None]
        params = params_for(cfg)
        folds, seed = cfg.eval.fusion_folds, cfg.run.seed
        pred = cross_fit(x, y, [self.rounds], folds, params, seed)[self.rounds]
        return placed(blended, cand, pred)

    def _inputs(self, signals, blended, history_rows, pairs) -> tuple[np.ndarray, np.ndarray]:
        """(candidates, features) as this model was fitted on them."""
        if not set(self.features) & set(PAIR_FEATURES):
            pairs = None  # fitted without them (eval.fusion_pairs=false, or an older export)
        cand, x, names = features(signals, blended, history_rows, self.top, pairs)
        if names != self.features:
            raise ValueError(
                f"the fusion model was fitted on features {self.features}, but these signals "
                f"give {names}: fit it again (jobs/blend.py) with the same eval.baselines"
            )
        return cand, x

    def save(self, export_dir: str | Path, details: dict) -> Path:
        folder = Path(export_dir)
        self.booster.save_model(str(folder / MODEL_FILE))
        meta = {"top": self.top, "features": self.features, **details, "rounds": self.rounds}
        (folder / META_FILE).write_text(json.dumps(meta, indent=2))
        return folder / MODEL_FILE

    @staticmethod
    def remove(export_dir: str | Path) -> None:
        """Drop an export's fusion model (one fitted on other blend weights must not stay)."""
        for name in (MODEL_FILE, META_FILE):
            (Path(export_dir) / name).unlink(missing_ok=True)

    @classmethod
    def load(cls, export_dir: str | Path) -> Fusion | None:
        """The fusion model of a retriever export, or None when it has none."""
        folder = Path(export_dir)
        if not (folder / MODEL_FILE).exists():
            return None
        meta = json.loads((folder / META_FILE).read_text())
        booster = lgb.Booster(model_file=str(folder / MODEL_FILE))
        return cls(booster, int(meta["top"]), list(meta["features"]), int(meta["rounds"]))


def lambdarank_params(leaves: int, learning_rate: float, threads: int, seed: int) -> dict:
    return {
        "objective": "lambdarank",
        "learning_rate": learning_rate,
        "num_leaves": leaves,
        "min_data_in_leaf": 50,
        "lambdarank_truncation_level": 20,
        "num_threads": threads,
        "deterministic": True,
        "force_row_wise": True,
        "seed": seed,
        "verbose": -1,
    }


def train_booster(x: np.ndarray, y: np.ndarray, users: np.ndarray, rounds: int, params: dict):
    """A booster on these users' groups; groups without their target teach nothing."""
    users = users[y[users].any(axis=1)]
    if not len(users):
        raise ValueError("no user's held-out item is among the candidates: nothing to learn")
    n, f = x.shape[1], x.shape[2]
    data = lgb.Dataset(x[users].reshape(-1, f), y[users].reshape(-1), group=np.full(len(users), n))
    return lgb.train(params, data, num_boost_round=rounds)


def params_for(cfg) -> dict:
    """`lambdarank_params` with `fit`'s default trees and the eval section's CPUs."""
    return lambdarank_params(LEAVES, LEARNING_RATE, max(1, int(cfg.eval.num_cpus)), cfg.run.seed)


def cross_fit(
    x: np.ndarray, y: np.ndarray, rounds: Sequence[int], folds: int, params: dict, seed: int
) -> dict[int, np.ndarray]:
    """{rounds: [U, N] scores}, each user's from a booster trained on the other folds' users:
    figures on the users a model was chosen on, without the model having seen them."""
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    out = {}
    for r in rounds:
        pred = np.zeros(y.shape)
        for f in range(folds):
            model = train_booster(x, y, np.flatnonzero(fold != f), r, params)
            held = np.flatnonzero(fold == f)
            pred[held] = model.predict(x[held].reshape(-1, x.shape[2])).reshape(len(held), -1)
        out[r] = pred
    return out


def fused_ranks(order: np.ndarray, cand: np.ndarray, target: np.ndarray, blend_ranks: np.ndarray):
    """Each target's rank once `order` [U, N] reorders the candidates; a target outside them
    keeps its blend rank (>= N)."""
    hit = np.take_along_axis(cand, order, axis=1) == target[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), blend_ranks)


def fit(
    signals: dict[str, np.ndarray],
    blended: np.ndarray,
    history_rows: Sequence[Sequence[int]],
    target: np.ndarray,
    top: int,
    rounds: Sequence[int],
    folds: int,
    threads: int,
    seed: int,
    ks: Sequence[int] = (10, 50),
    metric: str = "ndcg@10",
    leaves: int = LEAVES,
    learning_rate: float = LEARNING_RATE,
    pairs: Pairs | None = None,
) -> tuple[Fusion, dict]:
    """Choose the rounds by `folds`-fold cross-fitting on these users, then fit on all of them.

    Returns the model and what to record: the cross-fitted metrics of every round count and
    of the blend over the same users."""
    cand, x, names = features(signals, blended, history_rows, top, pairs)
    y = cand == np.asarray(target)[:, None]
    blend_ranks = metrics.target_ranks(blended, target)
    params = lambdarank_params(leaves, learning_rate, threads, seed)
    table = {"blend": metrics.ranking_metrics(blend_ranks, ks)}
    for r, pred in cross_fit(x, y, rounds, folds, params, seed).items():
        order = np.argsort(-pred, axis=1, kind="stable")
        ranks = fused_ranks(order, cand, np.asarray(target), blend_ranks)
        table[f"fusion, {r} rounds"] = metrics.ranking_metrics(ranks, ks)
    best = max(rounds, key=lambda r: table[f"fusion, {r} rounds"][metric])
    model = train_booster(x, y, np.arange(len(target)), best, params)
    gain = model.feature_importance("gain")
    gain = gain / max(gain.sum(), 1e-12)
    details = {
        "rounds": best,
        "cross_fitted": table,
        "feature_gain": {n: round(float(g), 4) for n, g in zip(names, gain, strict=True)},
    }
    return Fusion(model, top, names, best), details


def fit_for(
    cfg,
    signals: dict[str, np.ndarray],
    blended: np.ndarray,
    history_rows,
    target: np.ndarray,
    pairs: Pairs | None = None,
) -> tuple[Fusion, dict]:
    """`fit` with the eval section's choices (fusion_top, fusion_rounds, fusion_folds,
    fusion_pairs)."""
    return fit(
        signals,
        blended,
        history_rows,
        target,
        cfg.eval.fusion_top,
        cfg.eval.fusion_rounds,
        cfg.eval.fusion_folds,
        threads=max(1, int(cfg.eval.num_cpus)),
        seed=cfg.run.seed,
        ks=cfg.eval.ks,
        metric=cfg.train.metric,
        pairs=pairs if cfg.eval.fusion_pairs else None,
    )
