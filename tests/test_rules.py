"""Business rules: filters, boosts, diversity caps, explanations, reloading."""

from __future__ import annotations

import os
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest

from shoprank.serving.rules import RuleEngine, Rules, RulesError, RulesFile, load_rules

NOW = datetime(2026, 11, 1, tzinfo=UTC)


@pytest.fixture
def catalog() -> pa.Table:
    return pa.table(
        {
            "item_id": [f"i{i}" for i in range(6)],
            "category": ["Tools > Drills", "Tools > Saws", "Lab > Glass", None, "Tools", "Lab"],
            "brand": ["acme", "acme", "acme", "zeta", "zeta", "acme"],
            "in_stock": [True, True, False, True, None, True],
            "promoted": [False, False, False, False, True, False],
            "released_at": pa.array(
                [
                    datetime(2026, 10, 1),
                    datetime(2026, 10, 31),
                    None,
                    None,
                    None,
                    datetime(2025, 1, 1),
                ],
                pa.timestamp("s"),
            ),
        }
    )


def rules(**tree) -> Rules:
    return Rules.model_validate(tree)


SCORES = np.array([6.0, 5.0, 4.0, 3.0, 2.0, 1.0])  # the model's order: i0 > i1 > ... > i5


def test_filters_drop_and_count(catalog):
    r = rules(filters={"blocked_categories": ["Lab"]})
    out = RuleEngine(r, catalog).apply(np.arange(6), SCORES, k=6, history=np.array([0]))
    # i0 bought, i2 blocked and out of stock (counted once, as blocked), i5 blocked.
    assert out.rows.tolist() == [1, 3, 4]
    assert out.removed == {"blocked_category": 2, "already_purchased": 1}
    off = rules(filters={"out_of_stock": False, "already_purchased": False})
    assert RuleEngine(off, catalog).apply(np.arange(6), SCORES, k=6).rows.tolist() == list(range(6))


def test_boosts_reorder_and_explain(catalog):
    r = rules(
        filters={"out_of_stock": False, "already_purchased": False},
        boosts=[
            {"name": "promotion", "field": "promoted", "weight": 3.0},
            {"name": "sale", "items": ["i5", "nope"], "weight": 0.1},
        ],
    )
    out = RuleEngine(r, catalog).apply(np.arange(6), SCORES, k=3, explain=True)
    # z-scores of 6..1 step by ~0.59: +3 lifts i4 from 5th to 1st.
    assert out.rows.tolist() == [4, 0, 1]
    assert out.changes[4] == ["boost promotion +3", "model rank 5 -> 1"]
    assert out.changes[0] == ["model rank 1 -> 2"]
    unexplained = RuleEngine(r, catalog).apply(np.arange(6), SCORES, k=3)
    assert unexplained.rows.tolist() == [4, 0, 1] and unexplained.changes == {}


def test_freshness_halves_every_half_life(catalog):
    r = rules(
        filters={"out_of_stock": False},
        boosts=[{"name": "fresh", "field": "released_at", "weight": 1.0, "half_life_days": 30}],
    )
    engine = RuleEngine(r, catalog, now=NOW)
    gain = engine.boosts[0][1]
    assert gain[0] == pytest.approx(0.5 ** (31 / 30), rel=1e-4)  # 31 days old
    assert gain[1] == pytest.approx(0.5 ** (1 / 30), rel=1e-4)
    assert gain[2] == 0.0 and gain[5] < 1e-4  # no date: no boost; old: almost none


def test_diversity_caps_a_brand_in_the_top(catalog):
    r = rules(
        filters={"out_of_stock": False, "already_purchased": False},
        diversity=[{"field": "brand", "max_per": 2, "top_n": 4}],
    )
    out = RuleEngine(r, catalog).apply(np.arange(6), SCORES, k=6, explain=True)
    # acme: i0, i1 fill the cap; i2 waits behind the zetas, then the rest in order.
    assert out.rows.tolist() == [0, 1, 3, 4, 2, 5]
    assert any("brand='acme'" in why for why in out.changes[2])


def test_bad_rules_name_the_field(tmp_path, catalog):
    path = tmp_path / "rules.yaml"
    path.write_text("boosts:\n  - {name: x, weight: 1}\n")
    with pytest.raises(RulesError, match="either `field` or `items`"):
        load_rules(path)
    path.write_text("filter: {}\n")
    with pytest.raises(RulesError, match="filter"):
        load_rules(path)
    with pytest.raises(RulesError, match="'margin'"):
        RuleEngine(rules(boosts=[{"name": "m", "field": "margin", "weight": 1}]), catalog)


def test_rules_file_reloads_and_keeps_the_last_good(tmp_path, catalog):
    path = tmp_path / "rules.yaml"
    path.write_text("filters: {out_of_stock: false}\n")
    live = RulesFile(path, catalog)
    assert 2 in live.current().apply(np.arange(6), SCORES, k=6).rows
    path.write_text("filters: {out_of_stock: true}\n")
    os.utime(path, ns=(1, 10**18))  # a new mtime, however fast the write
    assert 2 not in live.current().apply(np.arange(6), SCORES, k=6).rows
    path.write_text("filters: {out_of_stock: maybe}\n")
    os.utime(path, ns=(1, 2 * 10**18))
    assert 2 not in live.current().apply(np.arange(6), SCORES, k=6).rows  # last good kept
    assert "out_of_stock" in live.error


def test_tiers_keep_the_reranked_head_ahead_and_scores_apart(catalog):
    """The serving app reranks a head of the candidates with a second model: the head stays
    ahead whatever the scales, a boost reorders only within its tier, and close head scores
    stay apart (an offset of 1e6 in float32 once rounded them to the same value)."""
    r = rules(
        filters={"out_of_stock": False, "already_purchased": False},
        boosts=[{"name": "promotion", "field": "promoted", "weight": 100.0}],  # i4
    )
    head = np.array([0.30, 0.31, 0.32])  # ranker logits for i0..i2, 0.01 apart
    tail = np.array([50.0, 40.0, 30.0])  # retriever scores for i3..i5, another scale
    out = RuleEngine(r, catalog).apply(
        np.arange(6), np.concatenate([head, tail]), k=6, tier=np.array([0, 0, 0, 1, 1, 1])
    )
    assert out.rows.tolist() == [2, 1, 0, 4, 3, 5]  # head by the ranker; i4 boosted in its tier
    assert len(set(out.scores[:3].tolist())) == 3 and out.scores[0] > out.scores[1]


def test_rules_file_deleted_or_undecodable_keeps_the_last_good(tmp_path, catalog):
    """Whatever breaks an edit (a deleted file, bytes that are not UTF-8, a value the catalog
    cannot take) leaves the last good rules in force, with the error kept until a good edit."""
    path = tmp_path / "rules.yaml"
    path.write_text("filters: {out_of_stock: true}\n")
    live = RulesFile(path, catalog)
    path.unlink()
    assert 2 not in live.current().apply(np.arange(6), SCORES, k=6).rows
    assert "gone" in live.error
    path.write_bytes(b"filters: {out_of_stock: \xff\xfe}\n")
    assert 2 not in live.current().apply(np.arange(6), SCORES, k=6).rows
    assert "UnicodeDecodeError" in live.error
    live.current()
    assert "UnicodeDecodeError" in live.error  # and it stays reported, request after request
    path.write_text("boosts: [{name: p, field: released_at, weight: 1}]\n")  # needs half_life
    live.current()
    assert live.error is not None
    path.write_text("filters: {out_of_stock: false}\n")
    os.utime(path, ns=(1, 5 * 10**18))
    assert 2 in live.current().apply(np.arange(6), SCORES, k=6).rows and live.error is None
