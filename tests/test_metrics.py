"""Metrics: agreement with scikit-learn, hand-computed ranks, and ties counted against the model."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from shoprank.evaluation import metrics
from shoprank.evaluation.metrics import (
    auc,
    graded_ndcg,
    grouped_ranks,
    logloss,
    pointwise_and_ranking,
    ranking_metrics,
    target_ranks,
)


def test_auc_and_logloss_equal_sklearn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    probs = rng.random(200)
    assert auc(labels, probs) == pytest.approx(roc_auc_score(labels, probs))
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs))


def test_logloss_clips_certain_mistakes() -> None:
    value = logloss([1, 0], [0.0, 1.0])
    assert np.isfinite(value)
    assert value == pytest.approx(-np.log(1e-7), rel=1e-6)


def test_target_ranks_ties_count_against_model() -> None:
    scores = np.array(
        [
            [0.9, 0.5, 0.1, 0.3],  # target 0: best, rank 0
            [0.5, 0.5, 0.1, 0.3],  # target 1: tied with col 0 -> rank 1
            [0.2, 0.2, 0.2, 0.2],  # constant scorer: target ranks last -> 3
            [0.1, 0.4, 0.4, 0.4],  # target 2 tied with 1 and 3 -> 2
        ]
    )
    target = np.array([0, 1, 3, 2])
    np.testing.assert_array_equal(target_ranks(scores, target), [0, 1, 3, 2])
    # The same in tiny chunks (chunking must not change anything).
    np.testing.assert_array_equal(target_ranks(scores, target, chunk_rows=1), [0, 1, 3, 2])


def test_target_ranks_repeated_candidate_counts_against_model() -> None:
    # Candidate list with the true item listed twice (ids a, b, a, c): the duplicate has the
    # target's score and must push it down one place.
    item_ids = np.array(["a", "b", "a", "c"])
    item_score = {"a": 0.8, "b": 0.9, "c": 0.1}
    scores = np.array([[item_score[i] for i in item_ids]])
    assert target_ranks(scores, np.array([0]))[0] == 2
    assert target_ranks(scores, np.array([2]))[0] == 2


def test_target_ranks_nan_ranks_last_and_checks_shapes() -> None:
    scores = np.array([[np.nan, 0.1, 0.2]])
    assert target_ranks(scores, np.array([0]))[0] == 2
    with pytest.raises(ValueError):
        target_ranks(scores, np.array([3]))
    with pytest.raises(ValueError):
        target_ranks(scores[0], np.array([0]))


def test_target_ranks_broadcast_view_chunked() -> None:
    row = np.array([3.0, 1.0, 2.0, 2.0])
    scores = np.broadcast_to(row, (5000, 4))
    target = np.tile([0, 1, 2, 3], 1250)
    ranks = target_ranks(scores, target, chunk_rows=777)
    np.testing.assert_array_equal(ranks, np.tile([0, 3, 2, 2], 1250))


def test_ranking_metrics_by_hand() -> None:
    ranks = np.array([0, 1, 9, 10, 49, 50])
    m = ranking_metrics(ranks, ks=(10, 50))
    assert m["recall@10"] == pytest.approx(3 / 6)
    assert m["recall@50"] == pytest.approx(5 / 6)
    gains = 1 / np.log2(np.array([0, 1, 9, 10, 49]) + 2)
    assert m["ndcg@10"] == pytest.approx(gains[:3].sum() / 6)
    assert m["ndcg@50"] == pytest.approx(gains.sum() / 6)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3) + 1 / np.log2(11)) / 6)


def _naive_grouped_ranks(group_ids, labels, scores) -> np.ndarray:
    out = []
    for g in np.unique(group_ids):
        rows = group_ids == g
        s, lab = scores[rows], labels[rows]
        pos = s[lab == 1][0]
        out.append(int((s >= pos).sum()) - 1)
    return np.array(out)


def test_grouped_ranks_matches_naive_loop_on_shuffled_rows() -> None:
    rng = np.random.default_rng(1)
    group_ids, labels, scores = [], [], []
    for g in range(50):
        n = int(rng.integers(2, 12))
        group_ids += [f"u{g}"] * n
        lab = np.zeros(n, dtype=int)
        lab[rng.integers(n)] = 1
        labels += lab.tolist()
        scores += rng.integers(0, 4, n).astype(float).tolist()  # coarse scores: many ties
    perm = rng.permutation(len(labels))
    group_ids = np.array(group_ids)[perm]
    labels = np.array(labels)[perm]
    scores = np.array(scores)[perm]
    np.testing.assert_array_equal(
        grouped_ranks(group_ids, labels, scores),
        _naive_grouped_ranks(group_ids, labels, scores),
    )


def test_grouped_ranks_tie_and_duplicate_against_model() -> None:
    ranks = grouped_ranks(
        ["q", "q", "q", "r", "r"],
        [0, 1, 0, 1, 0],
        [0.5, 0.5, 0.2, 0.3, 0.3],
    )
    np.testing.assert_array_equal(ranks, [1, 1])


def test_grouped_ranks_requires_exactly_one_positive() -> None:
    with pytest.raises(ValueError, match="'b'"):
        grouped_ranks(["a", "a", "b", "b"], [1, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="'b'"):
        grouped_ranks(["a", "a", "b", "b"], [1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4])


def test_pointwise_and_ranking_bundle() -> None:
    group_ids = np.repeat(np.arange(4), 3)
    labels = np.tile([1, 0, 0], 4)
    logits = np.array([2.0, 0.0, 1.0, -1.0, 0.5, 0.0, 3.0, 3.0, 0.0, 1.0, 0.0, -2.0])
    out = pointwise_and_ranking(group_ids, labels, logits)
    assert set(out) == {"auc", "logloss", "ndcg@10", "recall@10"}
    assert out["auc"] == pytest.approx(roc_auc_score(labels, logits))
    assert out["logloss"] == pytest.approx(log_loss(labels, expit(logits)))
    ranks = np.array([0, 2, 1, 0])
    assert out["ndcg@10"] == pytest.approx(np.mean(1 / np.log2(ranks + 2)))
    assert out["recall@10"] == 1.0


def test_graded_ndcg_equals_sklearn_on_hand_case() -> None:
    # q1 has a tie between a gain-3 and a gain-0 document; q3 has no relevant item (skipped).
    query_ids = ["q1"] * 4 + ["q2"] * 3 + ["q3"] * 2
    gains = [3, 0, 1, 2, 0, 1, 0.1, 0, 0]
    scores = [0.9, 0.9, 0.1, 0.5, 0.3, 0.2, 0.8, 0.5, 0.4]
    for k in (1, 2, 10):
        expected = np.mean(
            [
                ndcg_score([[3, 0, 1, 2]], [[0.9, 0.9, 0.1, 0.5]], k=k),
                ndcg_score([[0, 1, 0.1]], [[0.3, 0.2, 0.8]], k=k),
            ]
        )
        assert graded_ndcg(query_ids, gains, scores, k=k) == pytest.approx(expected)


def test_graded_ndcg_random_cases_match_sklearn() -> None:
    rng = np.random.default_rng(2)
    qids, gains, scores, per_query = [], [], [], []
    for q in range(30):
        n = int(rng.integers(2, 9))
        g = rng.integers(0, 4, n).astype(float)
        s = rng.integers(0, 4, n).astype(float)
        qids += [q] * n
        gains += g.tolist()
        scores += s.tolist()
        if g.sum() > 0:
            per_query.append(ndcg_score([g], [s], k=5))
    perm = rng.permutation(len(gains))
    got = graded_ndcg(np.array(qids)[perm], np.array(gains)[perm], np.array(scores)[perm], k=5)
    assert got == pytest.approx(np.mean(per_query))


def test_graded_ndcg_all_zero_is_nan() -> None:
    assert np.isnan(graded_ndcg(["a", "a"], [0, 0], [0.1, 0.2]))


def test_candidate_ranks_by_hand_with_ties_repeats_and_misses() -> None:
    # Catalog rows as candidates, -1 = padding from the index.
    candidates = np.array(
        [
            [7, 3, 5, 9],  # target 3 at score 0.8: one item above -> rank 1
            [4, 2, 6, 1],  # target 6 ties with 2 (0.5): ties count against -> rank 2
            [8, 8, 2, -1],  # target 2 below a repeated item 8: each copy counts -> rank 2
            [1, 2, 3, 4],  # target 0 not retrieved -> missing rank
            [5, 5, 1, 0],  # repeated target: its copies do not count against it -> rank 0
        ]
    )
    scores = np.array(
        [
            [0.9, 0.8, 0.7, 0.1],
            [0.9, 0.5, 0.5, 0.4],
            [0.6, 0.6, 0.3, 0.0],
            [0.9, 0.8, 0.7, 0.6],
            [0.9, 0.9, 0.2, 0.1],
        ]
    )
    target = np.array([3, 6, 2, 0, 5])
    ranks = metrics.candidate_ranks(candidates, scores, target, missing_rank=100)
    assert ranks.tolist() == [1, 2, 2, 100, 0]
    got = metrics.ranking_metrics(ranks, ks=(1, 3))
    assert got["recall@1"] == pytest.approx(1 / 5)
    assert got["recall@3"] == pytest.approx(4 / 5)
    by_hand = (1 / np.log2(3) + 1 / np.log2(4) + 1 / np.log2(4) + 0 + 1) / 5
    assert got["ndcg@3"] == pytest.approx(by_hand)


def test_candidate_ranks_agree_with_full_catalog_ranks() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=(50, 200)).astype(np.float32)  # many ties
    target = rng.integers(0, 200, size=50)
    full = metrics.target_ranks(scores, target)
    # Top 30 by score (ties in any order), as an index would return them.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :30]
    part = metrics.candidate_ranks(top, np.take_along_axis(scores, top, 1), target, 200)
    # Exact for every target whose true rank is inside the list...
    assert (part[full < 30] == full[full < 30]).all() and (full < 30).sum() > 5
    # ...and a target that was not retrieved is never a hit.
    retrieved = (top == target[:, None]).any(1)
    assert (part[~retrieved] == 200).all() and (full[~retrieved] >= 29).all()


def test_recall_curve_is_cumulative() -> None:
    ks, recall = metrics.recall_curve(np.array([0, 0, 2, 5, 99]), max_k=5)
    assert ks.tolist() == [1, 2, 3, 4, 5]
    assert recall.tolist() == pytest.approx([0.4, 0.4, 0.6, 0.6, 0.6])


def test_top_n_best_first_and_consistent_with_ranks() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(20, 30))
    top = metrics.top_n(scores, 5)
    assert top.shape == (20, 5)
    np.testing.assert_array_equal(top, np.argsort(-scores, axis=1)[:, :5])
    # A target ranked r < n by target_ranks sits at position r of the top n.
    ranks = metrics.target_ranks(scores, top[:, 3])
    assert (ranks == 3).all()
    assert metrics.top_n(scores, 99).shape == (20, 30)


def test_the_report_says_whether_fine_tuning_leads_beyond_the_noise() -> None:
    """`sampled.leads`: the fine-tuned ranker against its zero-shot self and the strongest
    other model on the same users, with a paired interval; a lead inside it is called level."""
    from shoprank.evaluation.sampled import TUNED, group_metrics, leads, leads_text

    rng = np.random.default_rng(0)
    labels = np.zeros((300, 20), dtype=np.float32)
    labels[:, 0] = 1.0

    def model(hit_rate: float) -> tuple[np.ndarray, np.ndarray]:
        scores = rng.random((300, 20)).astype(np.float32)
        scores[:, 0] += np.where(rng.random(300) < hit_rate, 2.0, 0.0)
        return scores, labels

    raw = {TUNED: model(0.8), "zero-shot m": model(0.3), "tfidf": model(0.5), "pop": model(0.1)}
    table = {name: group_metrics(*r, probabilistic=False) for name, r in raw.items()}
    found = leads(table, raw)
    assert [name for name, _, _ in found] == ["zero-shot m", "tfidf"]
    assert all(gain > half > 0 for _, gain, half in found)
    assert found[0][1] > found[1][1]  # further ahead of the weaker zero-shot model
    text = leads_text(found, 300).splitlines()
    assert text[0].startswith("The fine-tuned ranker leads zero-shot m:")
    assert text[1].startswith("The fine-tuned ranker leads tfidf, the strongest other model")
    assert "is level with tfidf, the strongest" in leads_text([("tfidf", 0.01, 0.02)], 300)
    assert "trails tfidf" in leads_text([("tfidf", -0.05, 0.02)], 300)
    # The zero-shot model is the strongest other: one comparison, named once.
    assert len(leads(table, {TUNED: raw[TUNED], "zero-shot m": raw["zero-shot m"]})) == 1
    assert leads(table, {TUNED: raw[TUNED]}) == [] and leads_text([], 0) == "–"
