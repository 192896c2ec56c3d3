"""The served-events log: impressions as events Parquet in `dt=` partitions, read back by the
project's own readers and validator, and /feedback's outcome rows beside them (`_outcomes/`),
joined to their answers where training data is built; every drop, loss and refusal counted; the
request never fails because of the log."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import serving_setup
from shoprank.data import contract
from shoprank.data.outcomes import join_logged, join_outcomes, read_parquet_folder
from shoprank.data.validate import check_events, reason_counts, split_quarantine
from shoprank.serving.impressions import (
    EventLog,
    ImpressionLogger,
    new_request_id,
    pseudonymize_events,
    request_time,
)

KEY = "impressions-key-3"
JSON = {"x-api-key": KEY, "content-type": "application/json"}
V = {"retriever": 4, "ranker": None}
MIDNIGHT = datetime(2025, 3, 2, tzinfo=UTC).timestamp()  # 2025-03-01 -> 2025-03-02 (UTC)


def _read(root: Path) -> pa.Table:
    """As the feature store and `pyarrow.dataset` read an events folder (hive partitions)."""
    return pads.dataset(root, partitioning="hive").to_table()


def _parts(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- rows, partitions, the contract ------------------------------------------------------------


def test_rows_land_in_day_partitions_in_the_events_contract(tmp_path):
    logger = ImpressionLogger(str(tmp_path / "log"), flush_s=3600)
    before, after = new_request_id(MIDNIGHT - 5), new_request_id(MIDNIGHT + 5)
    logger.served(before, "u1", None, ["a", "b", "c"], V, now=MIDNIGHT - 5)
    logger.served(after, None, "red mug", ["c", "a"], V, now=MIDNIGHT + 5)
    assert logger.feedback(before, "b", "click", now=MIDNIGHT + 6) == "logged"
    assert logger.flush() == 6
    files = _parts(tmp_path / "log")
    # A file a day; the outcome apart, in the `_` folder that events readers skip.
    assert [f.split("/")[0] for f in files] == ["_outcomes", "dt=2025-03-01", "dt=2025-03-02"]
    assert files[0].startswith("_outcomes/dt=2025-03-02/part-")
    assert all(f.split("/")[-1].startswith("part-") and f.endswith(".parquet") for f in files)

    impressions = _read(tmp_path / "log")
    assert impressions.column_names == [*contract.SERVED_EVENTS_SCHEMA.names, "dt"]
    outcomes = read_parquet_folder(str(tmp_path / "log" / "_outcomes"))
    assert outcomes.schema == contract.OUTCOMES_SCHEMA
    joined, counts = join_outcomes(impressions, outcomes)
    assert counts["joined"] == 1 and sum(counts.values()) == 1
    table = pa.concat_tables([impressions.drop_columns(["dt"]), joined])
    table = table.sort_by([("ts", "ascending"), ("position", "ascending")])
    rows = table.to_pylist()
    assert [(r["user_id"], r["item_id"], r["event"], r["position"]) for r in rows] == [
        ("u1", "a", "impression", 0),
        ("u1", "b", "impression", 1),
        ("u1", "c", "impression", 2),
        (f"anon-{after}", "c", "impression", 0),  # nobody named: one pseudo-user per answer
        (f"anon-{after}", "a", "impression", 1),
        ("u1", "b", "click", 1),  # the feedback: the answer's user and the item's position
    ]
    assert [r["query"] for r in rows] == [None, None, None, "red mug", "red mug", None]
    assert {r["request_id"] for r in rows[:3]} == {before} == {rows[5]["request_id"]}
    assert {(r["retriever_version"], r["ranker_version"]) for r in rows} == {(4, None)}
    assert rows[0]["ts"] == datetime(2025, 3, 1, 23, 59, 55)  # naive UTC, as the contract says
    good, bad = split_quarantine(check_events(table, pa.array(["a", "b", "c"])))
    assert reason_counts(bad) == {} and good.num_rows == 6
    info = logger.info()
    assert (info["rows_written"], info["files_written"], info["buffered"]) == (5, 2, 0)
    assert (info["outcomes"]["rows_written"], info["outcomes"]["files_written"]) == (1, 1)
    logger.close()


def test_request_ids_are_fresh_and_carry_their_time():
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    now = time.time()
    assert abs(request_time(new_request_id(now)) - now) < 0.002
    assert request_time("not-a-uuid") is None
    assert request_time("00000000-0000-4000-8000-000000000000") is None  # not ours (v4)


def test_the_thread_flushes_by_rows_and_by_time(tmp_path):
    by_rows = EventLog(str(tmp_path / "rows"), flush_s=3600, flush_rows=3)
    row = ("u", "a", datetime(2026, 1, 1), "impression", None, None, 0, "r", 1, 1, False)
    by_rows.add([row, row])
    time.sleep(0.2)
    assert by_rows.info()["rows_written"] == 0  # under flush_rows, long before flush_s
    by_rows.add([row])
    by_time = EventLog(str(tmp_path / "time"), flush_s=0.05, flush_rows=1000)
    by_time.add([row])
    deadline = time.time() + 10
    while time.time() < deadline and (
        by_rows.info()["rows_written"] < 3 or by_time.info()["rows_written"] < 1
    ):
        time.sleep(0.02)
    assert by_rows.info()["rows_written"] == 3 and by_time.info()["rows_written"] == 1
    by_rows.close()
    by_time.close()


# -- feedback ----------------------------------------------------------------------------------


def test_any_replica_logs_feedback_and_the_join_decides_and_counts(tmp_path):
    """Two replicas' logs (two loggers, one folder): feedback sent to the one that did not
    answer is logged all the same; the join keeps every valid outcome once, with the answer's
    user, position and versions, and counts the unknown, unserved, late and duplicate ones."""
    root = str(tmp_path / "log")
    one, two = ImpressionLogger(root, flush_s=3600), ImpressionLogger(root, flush_s=3600)
    t0 = 1_800_000_000.0
    first, second = new_request_id(t0), new_request_id(t0 + 1)
    one.served(first, "u1", None, ["a", "b"], V, now=t0)
    two.served(second, "u2", "mug", ["c"], {"retriever": 5, "ranker": 7}, now=t0 + 1)
    sent = [
        (two, first, "b", "click", t0 + 2),  # to the replica that did not answer
        (one, first, "b", "click", t0 + 3),  # duplicate
        (one, first, "b", "purchase", t0 + 4),  # another event: kept
        (one, second, "c", "click", t0 + 5),  # the other way round
        (two, first, "zzz", "click", t0 + 5),  # not_served
        (one, new_request_id(t0), "a", "click", t0 + 5),  # unknown_request
        (two, "not-one-of-ours", "a", "click", t0 + 5),  # unknown_request
        (one, second, "c", "add_to_cart", t0 + 1 + 1801),  # late
    ]
    for replica, rid, item, event, at in sent:
        assert replica.feedback(rid, item, event, now=at) == "logged"
    with pytest.raises(ValueError, match="event='impression'"):
        one.feedback(first, "a", "impression")
    assert one.flush() + two.flush() == 3 + len(sent)
    assert one.info()["feedback"] == {"logged": 5, "dropped": 0}
    joined, counts = join_outcomes(
        _read(tmp_path / "log"), read_parquet_folder(str(tmp_path / "log" / "_outcomes"))
    )
    assert counts == {
        "invalid": 0,
        "unknown_request": 2,
        "not_served": 1,
        "late": 1,
        "duplicate": 1,
        "joined": 3,
    }
    rows = [
        (r["user_id"], r["item_id"], r["event"], r["position"], r["ranker_version"], r["query"])
        for r in joined.to_pylist()
    ]
    assert rows == [
        ("u1", "b", "click", 1, None, None),
        ("u1", "b", "purchase", 1, None, None),
        ("u2", "c", "click", 0, 7, "mug"),
    ]
    assert joined["ts"][0].as_py() == datetime.fromtimestamp(t0 + 2, UTC).replace(tzinfo=None)
    one.close(), two.close()


def test_pseudonyms_join_the_shops_pseudonymized_events(tmp_path, monkeypatch):
    from shoprank.serving import auth

    monkeypatch.delenv(auth.USER_KEY_ENV, raising=False)
    monkeypatch.delenv(auth.USER_KEY_FILE_ENV, raising=False)
    with pytest.raises(ValueError, match="SHOPRANK_USER_HASH_KEY"):
        ImpressionLogger(str(tmp_path / "log"), user_ids="pseudonym")
    monkeypatch.setenv(auth.USER_KEY_ENV, "shop-secret")
    auth.reset_user_key()
    try:
        logger = ImpressionLogger(str(tmp_path / "log"), user_ids="pseudonym", flush_s=3600)
        logger.served(new_request_id(), "U42", None, ["a"], V)
        logger.close()
        # The shop's own events, copied with the same keyed pseudonym, partitions kept.
        shop = tmp_path / "shop" / "dt=2026-01-01"
        shop.mkdir(parents=True)
        ts = pa.array([datetime(2026, 1, 1)] * 2, pa.timestamp("us"))
        events = pa.table(
            {"user_id": ["U42", None], "item_id": ["a", "a"], "ts": ts, "event": ["purchase"] * 2}
        )
        pads.write_dataset(events, shop, format="parquet", basename_template="part-{i}.parquet")
        assert pseudonymize_events(str(tmp_path / "shop"), str(tmp_path / "out")) == {
            "files": 1,
            "rows": 2,
        }
        copied = _read(tmp_path / "out")
        served = _read(tmp_path / "log")
        assert copied["user_id"].to_pylist() == [auth.hash_user("U42"), None]
        assert served["user_id"].to_pylist() == [auth.hash_user("U42")] != ["U42"]
        assert copied["dt"].to_pylist() == ["2026-01-01"] * 2
        with pytest.raises(ValueError, match="inside it"):
            pseudonymize_events(str(tmp_path / "shop"), str(tmp_path / "shop" / "x"))
    finally:
        auth.reset_user_key()


# -- faults: a full buffer, storage that fails -------------------------------------------------


def test_a_full_buffer_drops_rows_and_counts_them(tmp_path):
    logger = ImpressionLogger(str(tmp_path / "log"), flush_s=3600, flush_rows=5, max_rows=5)
    logger.outcomes._writing.acquire()  # the outcomes' storage hangs: their buffer fills
    rid = new_request_id()
    logger.served(rid, "u1", None, ["a", "b", "c", "d"], V)  # 4 of 5
    logger.served(new_request_id(), "u2", None, ["a", "b"], V)  # would be 6: dropped
    got = [logger.feedback(rid, "b", "click") for _ in range(6)]
    assert got == ["logged"] * 5 + ["dropped"]  # the outcomes' own buffer: 5 rows
    info = logger.info()
    assert info["rows_dropped"] == 2 and info["buffered"] == 4
    assert info["feedback"] == {"logged": 5, "dropped": 1}
    assert info["outcomes"]["rows_dropped"] == 1 and info["outcomes"]["buffered"] == 5
    logger.outcomes._writing.release()
    logger.close()
    assert logger.info()["shutdown_rows"] == 4 and len(_read(tmp_path / "log")) == 4
    assert len(read_parquet_folder(str(tmp_path / "log" / "_outcomes"))) == 5
    logger.served(new_request_id(), "u1", None, ["a"], V)  # after close: dropped, counted
    assert logger.info()["rows_dropped"] == 3


def test_failing_storage_is_counted_and_the_thread_lives_on(tmp_path, caplog):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the log's folder should be")
    log = EventLog(str(blocker / "log"), flush_s=0.05, flush_rows=1)
    row = ("u", "a", datetime(2026, 1, 1), "impression", None, None, 0, "r", 1, 1, False)
    with caplog.at_level("ERROR", logger="ray.serve"):
        for _ in range(3):
            log.add([row])
            time.sleep(0.15)
    info = log.info()
    assert info["write_errors"] == 3 and info["rows_lost"] == 3 and info["thread_alive"]
    assert "write:" in info["last_error"]
    assert sum("event log" in r.message for r in caplog.records) == 1  # logged once
    blocker.unlink()  # storage is back: the same thread writes again
    log.add([row])
    deadline = time.time() + 10
    while log.info()["rows_written"] < 1 and time.time() < deadline:
        time.sleep(0.02)
    assert log.info()["rows_written"] == 1
    log.close()


# -- over the routes (in-process, through the gate) --------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_shop, tiny_model_dir):
    from fastapi.testclient import TestClient

    from shoprank.serving.plain import create
    from shoprank.serving.schemas import AppArgs

    tmp = tmp_path_factory.mktemp("impressions")
    setup = serving_setup(tmp, tiny_shop, tiny_model_dir, KEY)
    args = {
        **setup.args,
        "ranker_precision": "fp32",
        "impressions_dir": str(tmp / "served"),
        "impressions_flush_s": 3600,  # written when the test flushes or the app shuts down
    }
    app = create(AppArgs.model_validate(args))
    with TestClient(app, raise_server_exceptions=False) as c:
        c.headers["x-api-key"] = KEY
        yield c, tmp / "served"


def _front():
    from shoprank.serving.frontend import installed

    return installed()


def test_answers_carry_a_request_id_and_are_logged(client):
    c, root = client
    rec = c.post("/recommend", json={"user_id": "no-such-user", "k": 3}).json()
    found = c.post("/search", json={"query": "gel pens", "k": 4, "user_id": "u7"}).json()
    assert rec["request_id"] != found["request_id"]
    assert request_time(rec["request_id"]) == pytest.approx(time.time(), abs=60)
    _front().impressions.flush()
    table = _read(root)
    for answer, user, query in [(rec, "no-such-user", None), (found, "u7", "gel pens")]:
        mine = table.filter(pads.field("request_id") == answer["request_id"]).sort_by("position")
        assert mine["item_id"].to_pylist() == [i["item_id"] for i in answer["items"]]
        assert mine["position"].to_pylist() == list(range(len(answer["items"])))
        assert set(mine["user_id"].to_pylist()) == {user}
        assert set(mine["query"].to_pylist()) == {query}
        assert set(mine["retriever_version"].to_pylist()) == {answer["version"]["retriever"]}


def test_feedback_route(client):
    c, root = client
    answer = c.post("/recommend", json={"user_id": "u8", "k": 3}).json()
    rid, item = answer["request_id"], answer["items"][2]["item_id"]
    body = {"request_id": rid, "item_id": item, "event": "add_to_cart"}
    # Any well-formed outcome is logged; which belong to an answer the join decides.
    for sent in [
        body,
        body,
        {**body, "request_id": new_request_id()},
        {**body, "item_id": "not-in-that-answer"},
    ]:
        got = c.post("/feedback", json=sent)
        assert (got.status_code, got.json()) == (202, {"logged": True, "reason": None})
    for bad, field in [
        ({**body, "event": "impression"}, "event"),
        ({**body, "request_id": "x" * 36}, "request_id"),
        ({**body, "item_id": ""}, "item_id"),
        ({k: v for k, v in body.items() if k != "event"}, "event"),
        ({**body, "extra": 1}, "extra"),
    ]:
        got = c.post("/feedback", json=bad)
        assert got.status_code == 422 and got.json()["detail"][0]["loc"] == ["body", field]
    assert c.post("/feedback", json=body, headers={"x-api-key": "wrong"}).status_code == 401
    counted = c.get("/version").json()["impressions"]
    assert counted["feedback"] == {"logged": 4, "dropped": 0}
    _front().impressions.flush()
    joined, counts = join_outcomes(_read(root), read_parquet_folder(str(root / "_outcomes")))
    stored = joined.filter(pads.field("event") == "add_to_cart").to_pylist()
    assert [(r["user_id"], r["item_id"], r["position"]) for r in stored] == [("u8", item, 2)]
    assert (counts["duplicate"], counts["unknown_request"], counts["not_served"]) == (1, 1, 1)


def test_exploration_shows_the_head_in_a_random_order_flagged(client):
    """explore_share: such answers show the model's items in a random order (explore_top: k
    of its first explore_top), say so, and every row of them (impressions and feedback) is
    flagged `explored`; explain=true and rules=false never explore."""
    c, root = client
    body = {"user_id": "u8", "k": 5}
    plain = c.post("/recommend", json=body).json()
    head = [i["item_id"] for i in c.post("/recommend", json={**body, "k": 8}).json()["items"]]
    assert plain["explored"] is False
    front = _front()
    front.args.explore_share = 1.0
    try:
        answers = [c.post("/recommend", json=body).json() for _ in range(6)]
        explained = c.post("/recommend", json={**body, "explain": True}).json()
        unruled = c.post("/recommend", json={**body, "rules": False}).json()
        front.args.explore_top = 8
        deeper = [c.post("/recommend", json=body).json() for _ in range(6)]
        version = c.get("/version").json()["explore"]
    finally:
        front.args.explore_share, front.args.explore_top = 0.0, None
    order = [i["item_id"] for i in plain["items"]]
    assert order == head[:5] and version == {"share": 1.0, "top": 8}
    shown = [[i["item_id"] for i in a["items"]] for a in answers]
    assert all(a["explored"] for a in answers)
    assert not explained["explored"] and not unruled["explored"]  # the models' own order
    assert all(sorted(s) == sorted(order) for s in shown)  # the same items...
    assert any(s != order for s in shown)  # ... in another order (all 6 as ranked: 1 in 120^6)
    assert [i["item_id"] for i in explained["items"]] == order
    drawn = [[i["item_id"] for i in a["items"]] for a in deeper]
    assert all(len(d) == 5 == len(set(d)) and set(d) <= set(head) for d in drawn)
    assert set().union(*drawn) - set(order)  # items 6-8 shown too (never, in 6 draws: 1 in 56^6)
    first = answers[0]
    item = first["items"][0]["item_id"]
    click = {"request_id": first["request_id"], "item_id": item, "event": "click"}
    assert c.post("/feedback", json=click).json()["logged"] is True
    front.impressions.flush()
    table = _read(root)
    for answer, flag in [(plain, False), (first, True), (explained, False), (deeper[0], True)]:
        mine = table.filter(pads.field("request_id") == answer["request_id"])
        assert set(mine["explored"].to_pylist()) == {flag}
    joined, _ = join_outcomes(table, read_parquet_folder(str(root / "_outcomes")))
    clicked = joined.filter(pads.field("event") == "click").to_pylist()
    assert [(r["item_id"], r["position"], r["explored"]) for r in clicked] == [(item, 0, True)]


def test_exploration_needs_the_log():
    from shoprank.serving.schemas import AppArgs

    with pytest.raises(ValueError, match="explore_share=0.2 needs impressions_dir"):
        AppArgs.model_validate(
            {"retriever": "r", "catalog": "c.parquet", "events": "e", "explore_share": 0.2}
        )


# Hostile /feedback bodies: refused by the gate or the schema before any handler runs.
# tests/test_serve.py sends them over HTTP too.
FEEDBACK_HOSTILE = [
    (b'{"request_id": NaN, "item_id": "a", "event": "click"}', 400, "NaN"),
    (b'{"request_id": "r", "item_id": "\\ud800", "event": "click"}', 400, "surrogate"),
    (b'{"request_id": "r", "item_id": "\xff\xfe", "event": "click"}', 400, "UTF-8"),
    (b'{"request_id": "r", "item_id": 1e999, "event": "click"}', 400, "too large"),
    (b'{"a":' * 100 + b"1" + b"}" * 100, 400, "nests deeper"),
    (b"request_id=r", 400, "not JSON"),
    (b"[]", 422, "body"),
    (b'{"request_id": "r", "item_id": "' + b"x" * 70_000 + b'"}', 413, "limit"),
    (b'{"request_id": 7, "item_id": ["a"], "event": "click"}', 422, "request_id"),
]


@pytest.mark.parametrize("body, status, says", FEEDBACK_HOSTILE)
def test_hostile_feedback_gets_a_4xx_with_a_reason(client, body, status, says):
    c, _ = client
    got = c.post("/feedback", content=body, headers=JSON)
    assert got.status_code == status, got.text
    assert says in got.text and KEY not in got.text


def test_a_failing_log_never_fails_a_request(tmp_path, tiny_shop, tiny_model_dir):
    """Storage that hangs (the buffer fills), then refuses every write: the answers are all
    200, and /version counts the rows dropped and lost; the shutdown flush is counted too."""
    from fastapi.testclient import TestClient

    from shoprank.serving.plain import create
    from shoprank.serving.schemas import AppArgs

    setup = serving_setup(tmp_path, tiny_shop, tiny_model_dir, KEY)
    (tmp_path / "blocker").write_text("not a folder")
    args = {
        **setup.args,
        "ranker_precision": "fp32",
        "impressions_dir": str(tmp_path / "blocker" / "served"),
        "impressions_flush_s": 3600,
        "impressions_flush_rows": 5,
        "impressions_buffer_rows": 10,
    }
    with TestClient(create(AppArgs.model_validate(args))) as c:
        c.headers["x-api-key"] = KEY
        front = _front()
        with front.impressions.log._writing:  # storage hangs: no flush can finish
            statuses = [
                c.post("/recommend", json={"user_id": f"u{i}", "k": 5}).status_code
                for i in range(6)
            ]
            full = c.get("/version").json()["impressions"]
        front.impressions.flush()  # after the thread's own attempt: both fail
        failed = c.get("/version").json()["impressions"]
        statuses.append(c.post("/search", json={"query": "pens", "k": 5}).status_code)
    assert statuses == [200] * 7
    assert (full["buffered"], full["rows_dropped"], full["rows_lost"]) == (10, 20, 0)
    assert (failed["buffered"], failed["rows_lost"], failed["write_errors"]) == (0, 10, 1)
    assert failed["thread_alive"] and failed["rows_written"] == 0
    final = front.impressions.info()  # after the app's shutdown: the last flush, counted
    assert (final["shutdown_flushes"], final["shutdown_rows"], final["buffered"]) == (1, 0, 0)
    assert (final["rows_lost"], final["rows_dropped"], final["write_errors"]) == (15, 20, 2)


# -- what training reads -----------------------------------------------------------------------


def test_training_reads_the_log_unchanged_and_impressions_are_never_positives(
    ray_local, tmp_path, tiny_shop
):
    """The shop's events (no served columns) and the app's log in one events folder, its
    outcomes joined as a retraining joins them: the training loader (Ray Data) validates
    both, skips `_outcomes/`, and the training positives (`positive_events`,
    then the `ExampleBuilder` that `build_examples` runs per user) are the clicks and purchases,
    never an impression."""
    import pyarrow.parquet as pq

    from shoprank.config import DataConfig
    from shoprank.data.examples import ExampleBuilder, positive_events
    from shoprank.data.load import load_validated
    from shoprank.data.validate import check_catalog

    catalog, _ = split_quarantine(check_catalog(pq.read_table(tiny_shop / "catalog.parquet")))
    items = catalog["item_id"].to_pylist()
    events = tmp_path / "events"
    shop = events / "dt=2025-03-01"
    shop.mkdir(parents=True)
    ts = pa.array([datetime(2025, 3, 1, 12, m) for m in range(3)], pa.timestamp("us"))
    pq.write_table(
        pa.table(
            {"user_id": ["u1"] * 3, "item_id": items[:3], "ts": ts, "event": ["purchase"] * 3}
        ),
        shop / "part-0.parquet",
    )
    logger = ImpressionLogger(str(events), flush_s=3600)
    t = MIDNIGHT + 3600
    shown = {}
    for n in range(4):
        rid = new_request_id(t + n)
        shown[rid] = items[10 + 5 * n : 15 + 5 * n]
        logger.served(rid, "u1", None, shown[rid], V, now=t + n)
        assert logger.feedback(rid, shown[rid][n], "click", now=t + n + 0.5) == "logged"
    logger.close()
    clicked = [shown[rid][n] for n, rid in enumerate(shown)]
    joined, counts = join_logged([str(events)], ["2025-03-02"], str(tmp_path / "joined"))
    assert counts["joined"] == 4 == sum(counts.values())

    cfg = DataConfig(
        catalog=str(tiny_shop / "catalog.parquet"),
        events=str(events),
        judgments=None,
        negatives=2,
        eval_candidates=5,
        val_users=None,
        test_users=None,
        max_train_positives=None,
    )
    data = load_validated(cfg, str(tmp_path / "quarantine"), [str(events), *joined])
    assert data.counts["events"] == {"rows": 3 + 20 + 4, "bad": 0, "reasons": {}}
    rows = data.events.take_all()
    served = [r for r in rows if r.get("request_id") is not None]
    assert len(served) == 24 and {r["dt"] for r in served} == {"2025-03-02"}
    assert {r["dt"] for r in rows} == {"2025-03-01", "2025-03-02"}
    kept = pa.concat_tables(
        ray_local.get(positive_events(data.events, cfg.task).to_arrow_refs()),
        promote_options="default",  # the shop's blocks lack the served columns
    )
    assert sorted(kept["event"].to_pylist()) == ["click"] * 4 + ["purchase"] * 3
    groups = ExampleBuilder(data.catalog, cfg, seed=0)(kept).to_pylist()
    positives = {
        split: sorted(g["item_ids"][0] for g in groups if g["split"] == split)
        for split in ("train", "valid", "test")
    }
    # u1's 7 positives in time order: the shop's purchases, then the clicks (the first has no
    # history to predict from); leave-one-out puts the last two in valid and test.
    assert positives == {
        "train": sorted(items[1:3] + clicked[:2]),
        "valid": [clicked[2]],
        "test": [clicked[3]],
    }
    impressions_only = {i for ids in shown.values() for i in ids} - set(clicked)
    assert len(impressions_only) == 16
    assert not impressions_only & {i for split in positives.values() for i in split}
