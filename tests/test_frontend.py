"""The serving pieces without Ray: feature store, API keys, and the HTTP routes over in-process
models (the benchmark's plain baseline, which shares the routes with the Serve app)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import serving_setup
from shoprank.serving.auth import ApiKeys, hash_user
from shoprank.serving.features import ParquetFeatureStore

KEY = "frontend-key-42"


def _events(path, rows):
    t0 = datetime(2026, 1, 1)
    table = pa.table(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "ts": pa.array([t0 + timedelta(minutes=r[2]) for r in rows], pa.timestamp("us")),
            "event": [r[3] for r in rows],
        }
    )
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path / "part-0.parquet")


def test_feature_store_newest_first_positive_only_and_refresh(tmp_path):
    events = tmp_path / "events"
    rows = [("u1", "a", 1, "purchase"), ("u1", "b", 2, "click"), ("u1", "c", 3, "impression")]
    rows += [("u1", "d", 4, "add_to_cart"), ("u2", "a", 5, "purchase")]
    _events(events, rows)
    known = pa.array(["a", "b", "c", "d", "z"])
    store = ParquetFeatureStore(str(events), known, max_history=2, refresh_s=None)
    assert store.history("u1") == ["d", "b"]  # newest first, impressions ignored, capped at 2
    funnel = [("u4", "a", 1, "click"), ("u4", "b", 2, "click"), ("u4", "a", 3, "add_to_cart")]
    _events(events, funnel + [("u4", "a", 4, "purchase")])
    store.refresh()
    assert store.history("u4") == ["b", "a"]  # a's cart and purchase: a once, at its click
    assert store.history("nobody") is None
    assert store.popular(1) == ["a"]  # bought twice
    _events(events, [("u3", "z", 1, "purchase")])
    store.refresh()
    assert store.history("u3") == ["z"] and store.history("u4") is None
    assert store.info()["users"] == 1


def test_feature_store_validates_and_outlives_a_broken_snapshot(tmp_path):
    """Unknown items and duplicates are left out and counted; a refresh that fails for any
    reason (here a snapshot without user_id: a SchemaError) keeps the last snapshot serving."""
    import time

    events = tmp_path / "events"
    rows = [("u1", "a", 1, "purchase"), ("u1", "ghost", 2, "click"), ("u1", "a", 1, "purchase")]
    _events(events, rows)
    store = ParquetFeatureStore(str(events), pa.array(["a"]), refresh_s=0.05)
    assert store.history("u1") == ["a"]
    assert store.info()["quarantined"] == {"duplicate": 1, "unknown_item": 1}
    pq.write_table(pa.table({"item_id": ["a"]}), events / "part-0.parquet")
    deadline = time.time() + 10
    while store.error is None and time.time() < deadline:
        time.sleep(0.05)
    assert "user_id" in store.error and store.history("u1") == ["a"]
    time.sleep(0.2)  # the thread is still alive: a fixed snapshot is picked up
    _events(events, [("u2", "a", 1, "click")])
    while store.history("u2") is None and time.time() < deadline:
        time.sleep(0.05)
    assert store.history("u2") == ["a"] and store.error is None
    store.stop()  # a thread left reading Parquet at interpreter exit aborts the process


def test_api_keys_from_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SHOPRANK_API_KEYS", "k1, k2")
    (tmp_path / "keys").write_text("k3\n\n")
    keys = ApiKeys.load(str(tmp_path / "keys"))
    assert len(keys) == 3 and keys.valid("k2") and keys.valid("k3")
    assert not keys.valid("k4") and not keys.valid("") and not keys.valid(None)
    monkeypatch.delenv("SHOPRANK_API_KEYS")
    with pytest.raises(ValueError, match="SHOPRANK_API_KEYS"):
        ApiKeys.load(None)
    assert hash_user("U00001") == hash_user("U00001") != hash_user("U00002")
    assert "U00001" not in hash_user("U00001")


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_shop, tiny_model_dir):
    from fastapi.testclient import TestClient

    from shoprank.serving.plain import create
    from shoprank.serving.schemas import AppArgs

    setup = serving_setup(tmp_path_factory.mktemp("front"), tiny_shop, tiny_model_dir, KEY)
    app = create(AppArgs.model_validate({**setup.args, "ranker_precision": "fp32"}))
    with TestClient(app) as c:
        c.headers["x-api-key"] = KEY
        yield c, setup


def test_search_filters_and_explain(client):
    c, setup = client
    cat = setup.catalog.to_pylist()
    top = c.post("/search", json={"query": "storage bins", "k": 20}).json()["items"]
    assert len(top) == 20
    price = {r["item_id"]: r["price"] for r in cat}
    median = float(np.median(list(price.values())))
    cheap = c.post(
        "/search", json={"query": "storage bins", "k": 20, "filters": {"max_price": median}}
    ).json()["items"]
    assert len(cheap) == 20 and all(price[i["item_id"]] <= median for i in cheap)
    prefix = cat[0]["category"].split(" > ")[0]
    kept = c.post(
        "/search", json={"query": "pens", "k": 10, "filters": {"category": prefix}}
    ).json()["items"]
    category = {r["item_id"]: r["category"] for r in cat}
    assert kept and all(category[i["item_id"]].startswith(prefix) for i in kept)
    # A diversity cap from the rules file (re-read on change): one item per brand in the top n,
    # with n the first depth at which the model's own order repeats a brand (the tiny model is
    # random), and the response says which items it moved.
    plain = c.post("/search", json={"query": "pens", "k": 50}).json()["items"]
    brand = {r["item_id"]: r["brand"] for r in cat}
    brands = [brand[i["item_id"]] for i in plain]
    top_n = next(n for n in range(2, len(brands) + 1) if len(set(brands[:n])) < n)
    setup.rules.write_text(f"diversity: [{{field: brand, max_per: 1, top_n: {top_n}}}]\n")
    os.utime(setup.rules, ns=(1, 10**18))
    explained = c.post("/search", json={"query": "pens", "k": 50, "explain": True}).json()
    got = [brand[i["item_id"]] for i in explained["items"]]
    assert len(set(got[:top_n])) == top_n
    assert brands[:top_n] != got[:top_n]
    moved = [i for i in explained["items"] if any("diversity" in why for why in i["why"] or [])]
    assert moved and brand[moved[0]["item_id"]] == brands[top_n - 1]
    # rules=false: the models' own order, no rule applied (the fixture's rules drop items out
    # of stock; the diversity cap is still in the file), while request filters still apply.
    unruled = c.post("/search", json={"query": "pens", "k": 50, "rules": False}).json()
    in_stock = {r["item_id"]: r["in_stock"] for r in cat}
    order = [i["item_id"] for i in unruled["items"]]
    assert any(not in_stock[i] for i in order) and not unruled["explored"]
    stocked = [i for i in order if in_stock[i]]
    assert stocked == [i["item_id"] for i in plain][: len(stocked)]
    capped = {"query": "pens", "k": 10, "rules": False, "filters": {"category": prefix}}
    kept_unruled = c.post("/search", json=capped).json()["items"]
    assert kept_unruled and all(category[i["item_id"]].startswith(prefix) for i in kept_unruled)


def test_recommend_fallback_and_score_order(client):
    c, setup = client
    fallback = c.post("/recommend", json={"user_id": "no-such-user", "k": 5}).json()
    assert fallback["fallback"] == "popular" and len(fallback["items"]) == 5
    ids = setup.catalog["item_id"].to_pylist()[:4]
    scores = c.post("/score", json={"context": "gel pens", "item_ids": ids}).json()["scores"]
    assert len(scores) == 4 and np.isfinite(scores).all()
    # The same pairs in another order get the same scores (batching keeps requests apart).
    again = c.post("/score", json={"context": "gel pens", "item_ids": ids[::-1]}).json()
    assert again["scores"] == pytest.approx(scores[::-1], abs=1e-5)
    assert (
        c.post(
            "/score", json={"context": "x", "item_ids": ["a"]}, headers={"x-api-key": ""}
        ).status_code
        == 401
    )


def test_serve_config_fits_two_cores_and_holds_a_batch():
    """`serve run serve/config.yaml` on a 2-core machine: one replica of each deployment must
    be schedulable (measured: with 1 + 1 + 0.25 CPUs the Ingress never started), the Models
    replica must accept as many requests at once as it batches, and its torch threads follow
    the CPUs it holds (a 1-thread ranker on a 2-core machine took twice as long)."""
    from pathlib import Path

    import yaml

    from shoprank.serving import app
    from shoprank.serving.schemas import AppArgs

    for path in ("serve/config.yaml", "serve/synthetic.yaml"):
        spec = yaml.safe_load(Path(path).read_text())["applications"][0]
        args = AppArgs.model_validate(spec["args"])
        deployments = {d["name"]: d for d in spec["deployments"]}
        # the deployments listed are the ones the layout builds
        assert set(deployments) == ({"Server"} if args.layout == "one" else {"Models", "Ingress"})
        need = sum(
            d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"]["num_cpus"]
            for d in deployments.values()
        )
        assert need <= 2
        models = deployments["Server" if args.layout == "one" else "Models"]
        assert models["max_ongoing_requests"] >= models["user_config"]["max_batch_size"]
        assert args.torch_threads is None
    coded = [app.Models, app.Ingress]
    assert sum(d.ray_actor_options["num_cpus"] for d in coded) <= 2
    assert app.Models.max_ongoing_requests >= app.Models.user_config["max_batch_size"]
    # layout "one": the routes inside the model replica, which takes the whole machine
    assert (app.Models.name, app.Ingress.name, app.Server.name) == ("Models", "Ingress", "Server")
    assert app.Server.ray_actor_options["num_cpus"] <= 2
    assert app.Server.max_ongoing_requests >= app.Server.user_config["max_batch_size"]


def test_the_ranker_reranks_only_as_the_retriever_version_records(
    tmp_path, tiny_shop, tiny_model_dir
):
    """No rerank.json: stage one's order. A record that the ranker improves stage one, with the
    served ranker's weights: its mix over its count. A record for other weights, or one where the
    ranker lost: no rerank. /version says which."""
    from fastapi.testclient import TestClient

    from shoprank.registry import Registry
    from shoprank.retrieval import rerank
    from shoprank.serving.plain import create
    from shoprank.serving.schemas import AppArgs

    setup = serving_setup(tmp_path, tiny_shop, tiny_model_dir, KEY)
    setup.rules.write_text("filters: {out_of_stock: false, already_purchased: false}\n")
    args = {**setup.args, "ranker_precision": "fp32", "rerank_top": None, "poll_s": 3600}
    history = setup.catalog["item_id"].to_pylist()[:3]
    body = {"history": history, "k": 10, "explain": True}
    registry = Registry(setup.args["registry"])
    retriever = registry.get("retriever", "production").uri
    ranker = registry.get("ranker", "production").uri

    def served(record: rerank.RerankDecision | None):
        if record is not None:
            rerank.save(retriever, record)
        with TestClient(create(AppArgs.model_validate(args))) as c:
            c.headers["x-api-key"] = KEY
            return c.post("/recommend", json=body).json(), c.get("/version").json()

    alone, version = served(None)
    assert "no rerank decision" in version["stage_two"]
    record = rerank.RerankDecision(
        ranker_weights=rerank.weights_digest(ranker),
        rerank_top=4,
        mix=0.5,
        metric="ndcg@10",
        stage_one=0.10,
        two_stage=0.12,
        chosen_on="valid, 9 users",
    )
    mixed, version = served(record)
    assert "rerank the top 4, mix 0.5" in version["stage_two"]
    head = [i["item_id"] for i in alone["items"][:4]]
    assert {i["item_id"] for i in mixed["items"][:4]} == set(head)  # the head is reranked only
    stage_one = np.array([i["model_score"] for i in alone["items"][:4]])
    from shoprank.serving.services import RankerService, read_catalog

    ranker_scores = RankerService(
        setup.args["registry"], "ranker", "production", read_catalog(setup.args["catalog"]), "fp32"
    ).score_many([(history, None, None, head)])[0]["scores"]
    expected = rerank.mixed(stage_one, np.array(ranker_scores), 0.5)
    got = {i["item_id"]: i["model_score"] for i in mixed["items"][:4]}
    assert [got[i] for i in head] == pytest.approx(expected.tolist(), abs=1e-4)

    for stale, says in (
        (record.model_copy(update={"ranker_weights": "another ranker"}), "another ranker"),
        (record.model_copy(update={"two_stage": 0.09}), "does not improve"),
    ):
        again, version = served(stale)
        assert [i["item_id"] for i in again["items"]] == [i["item_id"] for i in alone["items"]]
        assert says in version["stage_two"]
