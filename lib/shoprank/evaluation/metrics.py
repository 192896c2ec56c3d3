"""Metrics shared by training, evaluation and tuning.

One module so that a number printed during training, in an evaluation report and in a Tune
trial means the same thing. Ranking metrics follow the sequential-recommendation protocol
(docs/DESIGN.md, "Evaluation protocols"): one relevant item per user, 0-based ranks, and ties
counted AGAINST the model (a constant scorer must not look good).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from statistics import NormalDist

import numpy as np
from scipy.special import expit
from sklearn.metrics import log_loss, roc_auc_score

from shoprank.config import PER_GROUP_METRICS

# Probabilities are clipped to [EPS, 1 - EPS] before the log loss, so that one confident
# mistake yields a large but finite loss instead of inf.
LOGLOSS_EPS = 1e-7

# Rows of a score matrix compared per chunk in `target_ranks`: 1024 x 4385 booleans is ~4.5 MB.
_RANK_CHUNK_ROWS = 1024


def auc(labels: Sequence[float] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC AUC (scikit-learn). nan, with sklearn's warning, when only one class is present."""
    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


def logloss(labels: Sequence[float] | np.ndarray, probs: Sequence[float] | np.ndarray) -> float:
    """Binary cross-entropy (scikit-learn) of probabilities clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(probs, dtype=np.float64), LOGLOSS_EPS, 1.0 - LOGLOSS_EPS)
    return float(log_loss(np.asarray(labels), p, labels=[0, 1]))


def _finite_scores(scores: np.ndarray) -> np.ndarray:
    """NaN scores become -inf, so a model that outputs NaN ranks last instead of first."""
    scores = np.asarray(scores)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    return scores


def target_ranks(
    scores: np.ndarray, target: np.ndarray, chunk_rows: int = _RANK_CHUNK_ROWS
) -> np.ndarray:
    """0-based rank of each row's target column, ties counted against the model.

    ``rank[u] = #{j != target[u] : scores[u, j] >= scores[u, target[u]]}``, so a candidate
    repeated in the row (same score as the target) pushes the target down. Rows are compared
    ``chunk_rows`` at a time, so the temporary boolean matrix stays a few MB even for the full
    catalog; ``scores`` may be a read-only broadcast view (e.g. popularity). NaN scores rank last.

    Note: a stable descending sort (ties broken by column index, as ``argsort``/``topk`` based
    evaluators do) ranks higher. The Amazon reference rows (docs/DESIGN.md) match that
    variant; with ties against, TF-IDF NDCG comes out ~0.0025 lower (recall is unchanged).
    """
    scores = np.asarray(scores)
    target = np.asarray(target, dtype=np.int64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_users, n_candidates], got shape {scores.shape}")
    n_users, n_cand = scores.shape
    if target.shape != (n_users,):
        raise ValueError(f"target must have shape ({n_users},), got {target.shape}")
    if n_users and (target.min() < 0 or target.max() >= n_cand):
        raise ValueError(f"target column out of range [0, {n_cand})")
    ranks = np.empty(n_users, dtype=np.int64)
    for start in range(0, n_users, chunk_rows):
        stop = min(start + chunk_rows, n_users)
        block = _finite_scores(scores[start:stop])
        t = block[np.arange(stop - start), target[start:stop]]
        # The target itself always satisfies >=, hence the -1.
        ranks[start:stop] = (block >= t[:, None]).sum(axis=1) - 1
    return ranks


def per_user_ranking(ranks: np.ndarray, ks: Iterable[int] = (10, 50)) -> dict[str, np.ndarray]:
    """Each user's Recall@k (0 or 1) and NDCG@k for one relevant item, from 0-based ranks:
    what `ranking_metrics` averages, and what a paired comparison of two models needs."""
    ranks = np.asarray(ranks, dtype=np.int64)
    gain = 1.0 / np.log2(ranks + 2.0)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = ranks < k
        out[f"recall@{k}"] = hit.astype(np.float64)
        out[f"ndcg@{k}"] = np.where(hit, gain, 0.0)
    return out


def ranking_metrics(ranks: np.ndarray, ks: Iterable[int] = (10, 50)) -> dict[str, float]:
    """Recall@k and NDCG@k for one relevant item per user, from 0-based ranks."""
    if np.asarray(ranks).size == 0:
        raise ValueError("ranking_metrics needs at least one rank")
    return {name: float(v.mean()) for name, v in per_user_ranking(ranks, ks).items()}


def grouped_ranks(
    group_ids: Sequence | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
) -> np.ndarray:
    """Rank of the single positive within each group (sampled-candidate protocol).

    Rows may come in any order. Ties count against the model, as in `target_ranks`. Returns
    one rank per group, in the order of ``np.unique(group_ids)``. Raises ValueError naming a
    group that does not hold exactly one positive (a silent miscount would skew every metric).
    """
    group_ids = np.asarray(group_ids)
    labels = np.asarray(labels)
    scores = _finite_scores(np.asarray(scores, dtype=np.float64))
    if not (group_ids.shape == labels.shape == scores.shape) or group_ids.ndim != 1:
        raise ValueError(
            "group_ids, labels and scores must be 1-D and equally long, got "
            f"{group_ids.shape}, {labels.shape}, {scores.shape}"
        )
    bad_label = ~np.isin(labels, (0, 1))
    if bad_label.any():
        raise ValueError(f"labels must be 0 or 1, got {labels[bad_label][0]!r}")
    groups, inv = np.unique(group_ids, return_inverse=True)
    pos = labels == 1
    n_pos = np.bincount(inv, weights=pos, minlength=len(groups))
    bad = np.flatnonzero(n_pos != 1)
    if bad.size:
        g = bad[0]
        raise ValueError(
            f"group {groups[g]!r} has {int(n_pos[g])} positives, expected exactly 1 "
            f"({bad.size} bad groups in all)"
        )
    pos_score = np.empty(len(groups), dtype=np.float64)
    pos_score[inv[pos]] = scores[pos]
    at_least = scores >= pos_score[inv]
    return np.bincount(inv, weights=at_least, minlength=len(groups)).astype(np.int64) - 1


def pointwise_and_ranking(
    group_ids: Sequence | np.ndarray,
    labels: Sequence[float] | np.ndarray,
    logits: Sequence[float] | np.ndarray,
    ks: Iterable[int] = (10,),
) -> dict[str, float]:
    """Training-time validation bundle: auc, logloss of sigmoid(logits), ndcg@k, recall@k."""
    labels = np.asarray(labels)
    logits = np.asarray(logits, dtype=np.float64)
    out = {"auc": auc(labels, logits), "logloss": logloss(labels, expit(logits))}
    out.update(ranking_metrics(grouped_ranks(group_ids, labels, logits), ks))
    return out


def graded_ndcg(
    query_ids: Sequence | np.ndarray,
    gains: Sequence[float] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    k: int = 10,
) -> float:
    """Mean NDCG@k over queries with graded gains (search judgments).

    Vectorised equivalent of scikit-learn's ``ndcg_score(k=k)`` applied per query, including
    its handling of ties (gains are averaged over a block of equal scores, so tie order cannot
    flatter the model). Queries whose gains are all zero have no ideal ranking and are SKIPPED
    (sklearn would count them as 0); returns nan when no query has a positive gain.
    Single-document queries are allowed (NDCG 1 when their gain is positive).
    """
    query_ids = np.asarray(query_ids)
    gains = np.asarray(gains, dtype=np.float64)
    scores = _finite_scores(np.asarray(scores, dtype=np.float64))
    if not (query_ids.shape == gains.shape == scores.shape) or gains.ndim != 1:
        raise ValueError("query_ids, gains and scores must be 1-D and equally long")
    if (gains < 0).any():
        raise ValueError("gains must be non-negative")
    if gains.size == 0:
        return float("nan")
    _, q = np.unique(query_ids, return_inverse=True)
    n_q = q.max() + 1

    def _positions(order: np.ndarray) -> np.ndarray:
        """0-based position of each sorted row within its query."""
        qs = q[order]
        starts = np.flatnonzero(np.r_[True, qs[1:] != qs[:-1]])
        return np.arange(len(qs)) - np.repeat(starts, np.diff(np.r_[starts, len(qs)]))

    def _discount(pos: np.ndarray) -> np.ndarray:
        return np.where(pos < k, 1.0 / np.log2(pos + 2.0), 0.0)

    # DCG: sort by query then score descending; average gains within blocks of tied scores.
    order = np.lexsort((-scores, q))
    qs, ss, gs = q[order], scores[order], gains[order]
    new_block = np.r_[True, (qs[1:] != qs[:-1]) | (ss[1:] != ss[:-1])]
    block = np.cumsum(new_block) - 1
    block_mean = np.bincount(block, weights=gs) / np.bincount(block)
    dcg = np.bincount(qs, weights=block_mean[block] * _discount(_positions(order)), minlength=n_q)

    # Ideal DCG: sort by gain descending.
    ideal = np.lexsort((-gains, q))
    idcg = np.bincount(q[ideal], weights=gains[ideal] * _discount(_positions(ideal)), minlength=n_q)

    keep = idcg > 0
    if not keep.any():
        return float("nan")
    return float(np.mean(dcg[keep] / idcg[keep]))


def candidate_ranks(
    candidates: np.ndarray, scores: np.ndarray, target: np.ndarray, missing_rank: int
) -> np.ndarray:
    """0-based rank of each row's target within its own candidate list, ties against.

    ``candidates`` [U, N] holds catalog rows (-1 = padding, ignored); ``scores`` [U, N] their
    scores. The rank counts every OTHER candidate scoring >= the target (a repeated non-target
    item counts each time it appears; repeats of the target itself do not). A target absent
    from its list gets ``missing_rank`` (use the catalog size: never a hit at any k <= N).
    For a top-N list this equals `target_ranks` over the full catalog whenever that rank is
    below N (tested); only ties straddling the cut can differ.
    """
    candidates = np.asarray(candidates)
    scores = _finite_scores(np.asarray(scores, dtype=np.float64))
    target = np.asarray(target, dtype=np.int64)
    if candidates.shape != scores.shape or candidates.ndim != 2:
        raise ValueError(f"candidates {candidates.shape} and scores {scores.shape} must match")
    is_target = candidates == target[:, None]
    found = is_target.any(axis=1)
    t = np.where(is_target, scores, -np.inf).max(axis=1)
    others = (~is_target) & (candidates >= 0) & (scores >= t[:, None])
    return np.where(found, others.sum(axis=1), missing_rank).astype(np.int64)


def recall_curve(ranks: np.ndarray, max_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Recall@k for k = 1..max_k: the fraction of targets ranked in the top k."""
    ks = np.arange(1, max_k + 1)
    counts = np.bincount(np.minimum(np.asarray(ranks), max_k), minlength=max_k + 1)[:max_k]
    return ks, np.cumsum(counts) / max(len(ranks), 1)


def top_n(scores: np.ndarray, n: int) -> np.ndarray:
    """[U, min(n, items)] columns of each row's n best scores, best first."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def paired_interval(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], metric: str, level: float
) -> tuple[float, float]:
    """(mean, half-width) of model a's per-group `metric` minus model b's on the same groups
    (rows lined up, as `score_models` returns them), a normal interval at `level`: how far
    apart two models are on one day's groups, and how much of that is the day's noise."""
    if metric not in PER_GROUP_METRICS:
        raise ValueError(
            f"a paired interval needs a per-group metric ({PER_GROUP_METRICS}), not {metric}"
        )

    def per_group(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return per_user_ranking(target_ranks(scores, labels.argmax(axis=1)), (10,))[metric]

    d = per_group(*a) - per_group(*b)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("inf")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return float(d.mean()), float(z * d.std(ddof=1) / np.sqrt(len(d)))


def paired_difference(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """(mean, half-width) of a - b over the same queries (or users), a normal interval at
    `level`: whether two systems scored on one query set differ by more than the set's noise.
    `paired_interval` does the same from two models' score matrices."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"a and b must be 1-D per-query values of equal length, got {d.shape}")
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("inf")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return float(d.mean()), float(z * d.std(ddof=1) / np.sqrt(len(d)))
