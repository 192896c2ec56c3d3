"""The fusion model: it learns what the blend's weighted sum cannot, and round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from shoprank.evaluation import metrics
from shoprank.retrieval import blend, fusion


def _shop(seed: int, users: int = 600, items: int = 80):
    """Signals where each user's own history items score highest, yet the held-out item is
    never one of them (as on Amazon): the blend fills its top slots with them."""
    rng = np.random.default_rng(seed)
    taste = rng.normal(size=(users, items))
    history = [rng.choice(items, size=rng.integers(1, 5), replace=False) for _ in range(users)]
    boost = np.zeros((users, items))
    for u, h in enumerate(history):
        boost[u, h] = 3.0
    masked = np.where(boost > 0, -np.inf, taste + rng.normal(scale=0.7, size=taste.shape))
    target = masked.argmax(axis=1)
    signals = {
        "retriever": blend.standardize(taste + boost),
        "covisit": blend.standardize(rng.normal(size=(users, items)) + boost),
    }
    return signals, [list(h) for h in history], target


def test_fusion_learns_to_demote_history_items_and_round_trips(tmp_path) -> None:
    signals, history, target = _shop(0)
    weights = {"retriever": 1.0, "covisit": 0.5}
    blended = blend.blend(signals, weights)
    model, details = fusion.fit(
        signals, blended, history, target, top=20, rounds=[20, 60], folds=2, threads=1, seed=0
    )
    table = details["cross_fitted"]
    fused = table[f"fusion, {details['rounds']} rounds"]["ndcg@10"]
    assert fused > table["blend"]["ndcg@10"] + 0.05
    assert details["feature_gain"]["history_position"] > 0

    # Unseen users from the same shop: the fitted model, reloaded, keeps the gain.
    signals2, history2, target2 = _shop(1)
    blended2 = blend.blend(signals2, weights)
    model.save(tmp_path, details)
    loaded = fusion.Fusion.load(tmp_path)
    scores = loaded.scores(signals2, blended2, history2)
    np.testing.assert_array_equal(scores, model.scores(signals2, blended2, history2))
    before = metrics.ranking_metrics(metrics.target_ranks(blended2, target2), [10])
    after = metrics.ranking_metrics(metrics.target_ranks(scores, target2), [10])
    assert after["ndcg@10"] > before["ndcg@10"] + 0.05
    # Only the top 20 move: below them the blend's order stands.
    top = metrics.top_n(blended2, 20)
    rest = np.ones_like(blended2, dtype=bool)
    np.put_along_axis(rest, top, False, axis=1)
    assert (scores[rest] == blended2[rest]).all()
    assert (np.take_along_axis(scores, top, 1).min(axis=1) > blended2.max(axis=1)).all()

    fusion.Fusion.remove(tmp_path)
    assert fusion.Fusion.load(tmp_path) is None


def test_fusion_refuses_other_signals(tmp_path) -> None:
    signals, history, target = _shop(0, users=200)
    weights = {"retriever": 1.0, "covisit": 0.5}
    model, _ = fusion.fit(
        signals, blend.blend(signals, weights), history, target, 20, [10], 2, 1, 0
    )
    fewer = {"retriever": signals["retriever"]}
    with pytest.raises(ValueError, match="fitted on features"):
        model.scores(fewer, blend.blend(fewer, {"retriever": 1.0}), history)


def test_ablation_refits_the_system_without_a_signal() -> None:
    from shoprank.config import Config
    from shoprank.evaluation import ablation
    from shoprank.retrieval.embed import Contexts

    cfg = Config.model_validate(
        {"eval": {"blend_trials": 8, "fusion_top": 20, "fusion_rounds": [20]}}
    )

    def split(seed: int) -> ablation.Signals:
        signals, history, target = _shop(seed, users=300)
        n = len(target)
        contexts = Contexts(np.arange(n), np.zeros((n, 2)), target, [[] for _ in range(n)])
        return ablation.Signals(contexts, signals, history)

    valid, test = split(0), split(1)
    full = ablation.fit_system(cfg, valid, test, ["retriever", "covisit"])
    alone = ablation.fit_system(cfg, valid, test, ["covisit"])
    assert set(full.weights) == {"retriever", "covisit"} and alone.weights == {"covisit": 1.0}
    # Fused beats the blend on unseen users, and the covisit-only system loses the retriever's
    # information (its taste signal): the ablation sees it.
    assert full.test["fused"]["ndcg@10"] > full.test["blend"]["ndcg@10"]
    assert full.test["fused"]["ndcg@10"] > alone.test["fused"]["ndcg@10"]
    scores = ablation.final_scores(full, test)
    after = metrics.ranking_metrics(metrics.target_ranks(scores, test.contexts.target), [10, 50])
    assert after == pytest.approx(full.test["fused"])
    # On valid, each user scored by the fold's model that did not see them reproduces the
    # cross-fitted figure (up to ties, which the fit's figure breaks by the blend's order and
    # target_ranks against the model), below the in-sample one of the model fitted on all.
    target = valid.contexts.target
    unseen = ablation.cross_fitted_scores(cfg, full, valid)
    again = metrics.ranking_metrics(metrics.target_ranks(unseen, target), [10, 50])
    assert again["recall@10"] == pytest.approx(full.valid["fused"]["recall@10"])
    assert again == pytest.approx(full.valid["fused"], abs=0.01)
    seen = ablation.final_scores(full, valid)
    in_sample = metrics.ranking_metrics(metrics.target_ranks(seen, target), [10])["ndcg@10"]
    assert in_sample > full.valid["fused"]["ndcg@10"]


def test_pair_features_find_the_item_next_to_the_newest_one(tmp_path) -> None:
    """The next item resembles the newest history item; the history signal, a decayed sum over
    the whole history, blurs that. The candidate-to-history features recover it."""
    rng = np.random.default_rng(0)
    users, n_items, dim = 800, 120, 16
    items = rng.normal(size=(n_items, dim))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    history = [list(rng.choice(n_items, size=6, replace=False)) for _ in range(users)]
    near_newest = items @ items[[h[0] for h in history]].T  # [items, users]
    for u, h in enumerate(history):
        near_newest[h, u] = -np.inf
    target = (near_newest.T + rng.normal(scale=0.05, size=(users, n_items))).argmax(axis=1)
    decayed = np.stack([items[h].T @ (0.9 ** np.arange(len(h))) for h in history])
    signals = {
        "history": blend.standardize(decayed @ items.T),
        "retriever": blend.standardize(rng.normal(size=(users, n_items))),
    }
    blended = blend.blend(signals, {"retriever": 1.0, "history": 1.0})

    def cross_fitted(pairs):
        _, details = fusion.fit(signals, blended, history, target, 40, [60], 2, 1, 0, pairs=pairs)
        return details["cross_fitted"]["fusion, 60 rounds"]["ndcg@10"], details

    without, _ = cross_fitted(None)
    pairs = fusion.Pairs(items.astype(np.float32))
    with_pairs, details = cross_fitted(pairs)
    assert with_pairs > without + 0.1
    assert details["feature_gain"]["last_similarity"] > 0.2
    # No co-visitation signal, no co-visitation feature.
    assert "covisit_last" not in details["feature_gain"]

    # A model fitted with them needs them to score, and scores the same once reloaded.
    model, _ = fusion.fit(signals, blended, history, target, 40, [20], 2, 1, 0, pairs=pairs)
    with pytest.raises(ValueError, match="fitted on features"):
        model.scores(signals, blended, history)
    model.save(tmp_path, {})
    np.testing.assert_array_equal(
        fusion.Fusion.load(tmp_path).scores(signals, blended, history, pairs),
        model.scores(signals, blended, history, pairs),
    )


def test_stage_two_lambdamart_learns_whom_to_trust() -> None:
    """Stage one's scores of the block carry nothing; the ranker's find the target when its
    raw score is high and carry nothing when it is low. Fitted on valid users, the model
    puts unseen test users' targets first where the ranker is sure; users whose target is
    outside the block keep their stage-one rank."""
    from shoprank.config import Config
    from shoprank.evaluation import ablation
    from shoprank.evaluation.full_catalog import RankerBlock

    cfg = Config.model_validate({"eval": {"fusion_rounds": [20, 40]}})
    m = 10

    def split(seed: int, users: int = 400) -> tuple[RankerBlock, np.ndarray]:
        rng = np.random.default_rng(seed)
        where = rng.integers(0, m, users)
        labels = np.zeros((users, m), np.float32)
        labels[np.arange(users), where] = 1
        sure = rng.random(users) < 0.5
        scores = rng.normal(size=(users, m)).astype(np.float32)
        scores[sure] += 4 * labels[sure] + 3  # sure: high scores, the target highest
        block = RankerBlock(np.arange(users), scores, labels, rng.normal(size=(users, m)))
        stage_one = np.concatenate([where, rng.integers(m, 500, 100)])  # 100 users outside
        return block, stage_one

    (valid, valid_ranks), (test, test_ranks) = split(0), split(1)
    fitted_valid, fitted_test, rounds = ablation.fit_rerank_fusion(
        cfg, valid, valid_ranks, test, test_ranks
    )
    assert rounds in (20, 40)
    sure = test.scores.max(axis=1) > 3
    assert (fitted_test[: len(sure)][sure] == 0).mean() > 0.9
    assert np.array_equal(fitted_test[400:], test_ranks[400:])
    before = metrics.ranking_metrics(test_ranks, [10])["ndcg@10"]
    assert metrics.ranking_metrics(fitted_test, [10])["ndcg@10"] > before + 0.2
    assert metrics.ranking_metrics(fitted_valid, [10])["ndcg@10"] > before + 0.2


def test_stage_one_scores_the_users_its_fusion_saw_without_them() -> None:
    """On valid, where the export's fusion was fitted, evaluation must not report the fitted
    model's in-sample figure: each user is scored by a fold's model that did not see them."""
    from shoprank.config import Config
    from shoprank.retrieval.stage_one import StageOne

    rng = np.random.default_rng(4)
    users, n_items, dim = 500, 60, 8
    items = rng.normal(size=(n_items, dim))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    ids = [f"i{j}" for j in range(n_items)]
    rows = [list(rng.choice(n_items, size=rng.integers(1, 5), replace=False)) for _ in range(users)]
    contexts = np.stack([items[r].mean(axis=0) for r in rows]) + rng.normal(size=(users, dim))
    taste = contexts @ items.T + rng.normal(scale=0.5, size=(users, n_items))
    for u, r in enumerate(rows):
        taste[u, r] = -np.inf  # the held-out item is never in the history
    target = taste.argmax(axis=1)
    histories = [[ids[j] for j in r] for r in rows]
    cfg = Config.model_validate({"eval": {"fusion_top": 20, "fusion_rounds": [40]}})

    stage = StageOne(ids, items, {"retriever": 1.0, "history": 0.5}, {}, 0.5)
    by_stage = stage.stage_scores(contexts, histories)
    signals = blend.signals(contexts, histories, items, ids, {}, 0.5)
    stage.fusion, details = fusion.fit_for(
        cfg, signals, by_stage["blend"], rows, target, blend.pairs(items, {})
    )

    def table(scores: np.ndarray) -> dict[str, float]:
        return metrics.ranking_metrics(metrics.target_ranks(scores, target), [10])

    held = table(stage.stage_scores(contexts, histories, (cfg, target))["fused"])
    seen = table(stage.stage_scores(contexts, histories)["fused"])
    cross_fitted = details["cross_fitted"]["fusion, 40 rounds"]
    # The fit's own cross-fitted figure, again (ties aside: the fit breaks them by the blend's
    # order, target_ranks against the model), and below the in-sample figure.
    assert held["recall@10"] == pytest.approx(cross_fitted["recall@10"])
    assert held["ndcg@10"] == pytest.approx(cross_fitted["ndcg@10"], abs=0.01)
    assert seen["ndcg@10"] > held["ndcg@10"]
