"""The blended stage one: standardised signals, weights, and the Optuna search on valid."""

from __future__ import annotations

import numpy as np
import pytest

from shoprank.evaluation import metrics
from shoprank.retrieval import blend


def test_standardize_rows_and_constant_rows() -> None:
    x = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    z = blend.standardize(x)
    np.testing.assert_allclose(z[0], [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    assert z.dtype == np.float32 and not z[1].any()


def test_history_vectors_decay_newest_first() -> None:
    items = np.eye(3, dtype=np.float32)
    v = blend.history_vectors([["b", "a"], []], items, ["a", "b", "c"], decay=0.5)
    np.testing.assert_allclose(v[0], np.array([0.5, 1.0, 0.0]) / np.sqrt(1.25), rtol=1e-6)
    assert not v[1].any()  # no history: a zero vector, not NaN


def test_blend_weights_and_errors() -> None:
    s = {"retriever": np.array([[1.0, 0.0]]), "covisit": np.array([[0.0, 2.0]])}
    np.testing.assert_allclose(blend.blend(s, {"retriever": 1, "covisit": 0.5}), [[1.0, 1.0]])
    assert blend.blend(s, {"retriever": 1, "covisit": 0}) is not s["retriever"]  # no aliasing
    with pytest.raises(ValueError, match=r"\['tfidf'\].*use names from"):
        blend.blend(s, {"retriever": 1, "tfidf": 1})
    with pytest.raises(ValueError, match="all zero"):
        blend.blend(s, {"retriever": 0})


def test_search_finds_the_informative_signal() -> None:
    # 400 users, 50 items: the retriever is noisy, co-visitation points at the target, the
    # popularity signal is pure noise. The search must weigh co-visitation and beat the
    # retriever alone; its first trial is the retriever alone.
    rng = np.random.default_rng(0)
    users, items = 400, 50
    target = rng.integers(0, items, users)
    onehot = np.eye(items)[target]
    signals = {
        "retriever": blend.standardize(onehot + rng.normal(0, 1.0, (users, items))),
        "covisit": blend.standardize(onehot + rng.normal(0, 0.8, (users, items))),
        "popularity": blend.standardize(rng.normal(0, 1, (users, items))),
    }
    weights, trials = blend.search_weights(signals, target, trials=25, seed=0)
    assert trials[0]["covisit"] == trials[0]["popularity"] == 0.0
    alone = trials[0]["ndcg@10"]
    best = metrics.ranking_metrics(metrics.target_ranks(blend.blend(signals, weights), target))
    assert best["ndcg@10"] == max(t["ndcg@10"] for t in trials) > alone + 0.05
    assert weights["retriever"] == 1.0 and weights["covisit"] > weights["popularity"]


def test_save_and_load_round_trip(tmp_path) -> None:
    assert blend.load(tmp_path) is None
    blend.save(tmp_path, {"retriever": 1.0, "covisit": 0.3}, {"metric": "ndcg@10"})
    assert blend.load(tmp_path) == {"retriever": 1.0, "covisit": 0.3}
