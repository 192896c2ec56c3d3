"""The ANN index: agreement with exact search, save/load round trip."""

from __future__ import annotations

import numpy as np

from shoprank.config import IndexConfig
from shoprank.retrieval import index as ann


def _unit(rng, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hnsw_agrees_with_exact_search_and_round_trips(tmp_path) -> None:
    rng = np.random.default_rng(0)
    items, queries = _unit(rng, 3000, 32), _unit(rng, 200, 32)
    ids = [f"item{i}" for i in range(len(items))]
    params = ann.params(IndexConfig(kind="hnsw", hnsw_m=16, ef_search=128), len(ids))
    built = ann.ItemIndex.build(ids, items, params, {"fingerprint": {"x": 1}})

    _, exact = ann.exact_search(queries, items, 10)
    _, approx = built.search(queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact, strict=True)])
    assert recall >= 0.95

    loaded = ann.ItemIndex.load(built.save(tmp_path / "index"))
    assert loaded.item_ids == ids and loaded.info["params"] == params
    np.testing.assert_array_equal(loaded.embeddings, items)
    _, again = loaded.search(queries, 10)
    np.testing.assert_array_equal(again, approx)


def test_flat_index_is_exact_and_auto_picks_by_size() -> None:
    rng = np.random.default_rng(1)
    items, queries = _unit(rng, 500, 16), _unit(rng, 20, 16)
    built = ann.ItemIndex.build([str(i) for i in range(500)], items, {"kind": "flat"}, {})
    s1, r1 = built.search(queries, 5)
    s2, r2 = ann.exact_search(queries, items, 5)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5)
    cfg = IndexConfig(exact_below=1000)
    assert ann.index_kind(cfg, 999) == "flat" and ann.index_kind(cfg, 1000) == "hnsw"
