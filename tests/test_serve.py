"""The Serve app for real: a local Ray Serve application with tiny models, called over HTTP."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import free_port, make_export, serving_setup
from shoprank.data.outcomes import join_outcomes, read_parquet_folder

pytestmark = pytest.mark.slow

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def app(ray_local, tmp_path_factory, tiny_shop, tiny_model_dir):
    """(base URL, registry, paths): the app serving v1 of both models."""
    from ray import serve

    from shoprank.serving.app import build_app

    tmp = tmp_path_factory.mktemp("serve")
    setup = serving_setup(tmp, tiny_shop, tiny_model_dir, KEY)
    args = {**setup.args, "poll_s": 0.5, "ranker_precision": "fp32", "docs": True}
    args |= {"impressions_dir": str(tmp / "served"), "impressions_flush_s": 0.5}
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="shoprank", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}", setup
    finally:
        serve.shutdown()


def post(url: str, path: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60, **kw)


def _known_user(tiny_shop: Path) -> tuple[str, list[str]]:
    events = pads.dataset(tiny_shop / "events", partitioning="hive").to_table()
    bought = events.filter(pads.field("event") == "purchase")
    user = bought["user_id"][0].as_py()
    return user, [r["item_id"] for r in bought.to_pylist() if r["user_id"] == user]


def get(url: str, path: str, key: str | None = KEY) -> httpx.Response:
    return httpx.get(url + path, headers={"x-api-key": key} if key else {}, timeout=60)


def test_health_version_and_openapi(app):
    url, *_ = app
    assert get(url, "/healthz", key=None).json() == {"status": "ok"}
    assert get(url, "/version", key=None).status_code == 401
    version = get(url, "/version").json()
    assert version["models"] == {"retriever": 1, "ranker": 1}
    paths = get(url, "/openapi.json").json()["paths"]  # this app's args turn docs on
    assert {"/recommend", "/search", "/score", "/feedback", "/healthz", "/version"} <= set(paths)


def test_recommend_search_score(app, tiny_shop):
    url, setup = app
    catalog = setup.catalog
    user, bought = _known_user(tiny_shop)
    got = post(url, "/recommend", {"user_id": user, "k": 5, "explain": True})
    assert got.status_code == 200, got.text
    body = got.json()
    assert len(body["items"]) == 5 and body["fallback"] is None
    assert body["version"] == {"retriever": 1, "ranker": 1}
    ids = [i["item_id"] for i in body["items"]]
    assert not set(ids) & set(bought)  # already purchased: filtered
    in_stock = dict(
        zip(catalog["item_id"].to_pylist(), catalog["in_stock"].to_pylist(), strict=True)
    )
    assert all(in_stock[i] is not False for i in ids)

    unknown = post(url, "/recommend", {"user_id": "nobody-at-all", "k": 3}).json()
    assert unknown["fallback"] == "popular" and len(unknown["items"]) == 3

    explicit = post(url, "/recommend", {"history": ids[:2], "k": 4}).json()
    assert len(explicit["items"]) == 4 and not set(ids[:2]) & {
        i["item_id"] for i in explicit["items"]
    }

    brand = catalog["brand"][0].as_py()
    found = post(url, "/search", {"query": "gel pens", "k": 5, "filters": {"brand": brand}})
    assert found.status_code == 200, found.text
    assert {i["item_id"] for i in found.json()["items"]} <= {
        r["item_id"] for r in catalog.to_pylist() if r["brand"] == brand
    }

    scored = post(url, "/score", {"context": "gel pens", "item_ids": [ids[0], "NOPE"]}).json()
    assert isinstance(scored["scores"][0], float) and scored["scores"][1] is None
    assert scored["unknown_items"] == ["NOPE"]

    # The answers were logged as impressions; feedback on one as an outcome row beside them
    # (the replica's thread writes every 0.5 s); joined, the log reads as events.
    click = {"request_id": body["request_id"], "item_id": ids[3], "event": "click"}
    assert post(url, "/feedback", click).json() == {"logged": True, "reason": None}
    served = setup.tmp / "served"
    deadline = time.time() + 30
    while time.time() < deadline:
        outcomes = read_parquet_folder(str(served / "_outcomes"))
        if outcomes is not None:
            break
        time.sleep(0.25)
    impressions = pads.dataset(served, partitioning="hive").to_table()
    joined, _ = join_outcomes(impressions, outcomes)
    got = pa.concat_tables([impressions.drop_columns(["dt"]), joined])
    mine = got.filter(pads.field("request_id") == body["request_id"]).to_pylist()
    assert sorted((r["event"], r["position"]) for r in mine if r["item_id"] == ids[3]) == [
        ("click", 3),
        ("impression", 3),
    ]
    assert {r["user_id"] for r in mine} == {user}
    assert {found.json()["request_id"], unknown["request_id"]} <= set(got["request_id"].to_pylist())


@pytest.mark.parametrize(
    "path,body,where",
    [
        ("/recommend", {"user_id": "u", "k": "ten"}, ["body", "k"]),
        ("/recommend", {"user_id": "u", "k": 1000}, ["body", "k"]),
        ("/recommend", {"k": 3}, ["body"]),  # neither user_id nor history
        ("/recommend", {"user_id": "u", "colour": "red"}, ["body", "colour"]),
        ("/search", {"query": "   "}, ["body", "query"]),
        ("/search", {"query": ""}, ["body", "query"]),
        ("/score", {"context": "x", "item_ids": []}, ["body", "item_ids"]),
    ],
)
def test_bad_input_is_422_naming_the_field(app, path, body, where):
    url, *_ = app
    got = post(url, path, body)
    assert got.status_code == 422, got.text
    assert any(e["loc"][: len(where)] == where for e in got.json()["detail"]), got.json()


def test_malformed_json_oversized_body_and_keys(app):
    url, *_ = app
    raw = httpx.post(
        url + "/recommend",
        content=b'{"user_id": "u", "k": ',
        headers={"x-api-key": KEY, "content-type": "application/json"},
    )
    assert raw.status_code == 400 and "not JSON" in raw.text
    big = post(url, "/score", {"context": "x" * 70_000, "item_ids": ["a"]})
    assert big.status_code == 413
    assert post(url, "/recommend", {"user_id": "u"}, key=None).status_code == 401
    wrong = post(url, "/recommend", {"user_id": "u"}, key="wrong")
    assert wrong.status_code == 401 and KEY not in wrong.text


def test_rules_file_changes_the_order(app, tiny_shop):
    url, setup = app
    catalog = setup.catalog
    user, _ = _known_user(tiny_shop)
    before = post(url, "/recommend", {"user_id": user, "k": 5}).json()["items"]
    top = before[0]["item_id"]
    category = next(r["category"] for r in catalog.to_pylist() if r["item_id"] == top)
    setup.rules.write_text(f"filters: {{blocked_categories: [{json.dumps(category)}]}}\n")
    after = post(url, "/recommend", {"user_id": user, "k": 5, "explain": True}).json()
    assert top not in {i["item_id"] for i in after["items"]}
    assert after["removed"]["blocked_category"] >= 1


def test_hot_swap_under_load_fails_nothing(app, tiny_shop, tiny_model_dir):
    url, setup = app
    user, _ = _known_user(tiny_shop)
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                r = client.post(
                    url + "/recommend", json={"user_id": user, "k": 5}, headers={"x-api-key": KEY}
                )
                statuses.append(r.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    export = make_export(setup.tmp / "ranker-v2", "ranker", tiny_model_dir, setup.cfg, seed=2)
    setup.registry.register("ranker", str(export))
    assert setup.registry.promote("ranker", 2, "val_ndcg@10").promoted
    deadline = time.time() + 60
    while get(url, "/version").json()["models"]["ranker"] != 2:
        assert time.time() < deadline, "the app never picked up ranker v2"
        time.sleep(0.5)
    served = len(statuses)
    time.sleep(2)  # and keeps serving on the new version
    stop.set()
    for t in threads:
        t.join()
    assert len(statuses) > served > 0
    assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}


def test_hostile_requests_over_http(app):
    """The hand-written hostile cases through Serve's HTTP proxy, plus what only a real
    connection can send: a chunked 1 MB body (no Content-Length) and an oversized one."""
    from test_hardening import HOSTILE
    from test_impressions import FEEDBACK_HOSTILE

    url, *_ = app
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    with httpx.Client(timeout=60) as client:
        hostile = HOSTILE + [("/feedback", *case) for case in FEEDBACK_HOSTILE]
        for path, body, status, says in hostile:
            got = client.post(url + path, content=body, headers=headers)
            assert (got.status_code, path) == (status, path) and says in got.text, got.text

        def chunks():
            yield b'{"context": "'
            for _ in range(64):
                yield b"x" * 16_384
            yield b'", "item_ids": ["a"]}'

        chunked = client.post(url + "/score", content=chunks(), headers=headers)
        assert chunked.status_code == 413 and "limit" in chunked.text
        assert (
            client.post(
                url + "/score", content=b"{}", headers={**headers, "content-type": "text/plain"}
            ).status_code
            == 415
        )
        assert client.delete(url + "/recommend", headers=headers).status_code == 405
        assert client.get(url + "/healthz").json() == {"status": "ok"}  # and it is still up


@pytest.fixture(scope="module")
def edge(app):
    """The edge proxy (serving/edge.py) in front of the app's Serve proxy, on its own port."""
    import uvicorn

    from shoprank.serving.edge import create_edge

    url, *_ = app
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_edge(url), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_edge_forwards_the_apps_routes_and_nothing_of_serves_own(app, edge):
    """Serve's proxy lists every application at /-/routes to anyone; behind the edge only the
    app's routes answer, each as the app answers it, hostile bodies included."""
    from test_hardening import HOSTILE

    url, *_ = app
    assert httpx.get(url + "/-/routes").status_code == 200  # what the edge is for
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    with httpx.Client(timeout=60) as client:
        for path in ("/-/routes", "/-/healthz", "/-/anything", "/admin", "/healthz/../-/routes"):
            got = client.get(edge + path)
            assert got.status_code == 404 and "shoprank" not in got.text, path
        assert client.get(edge + "/healthz").json() == {"status": "ok"}
        proxied = client.get(edge + "/version", headers=headers)
        assert proxied.status_code == 200
        direct = get(url, "/version").json()
        assert proxied.json().keys() == direct.keys() and proxied.json()["alias"] == direct["alias"]
        answer = client.post(edge + "/recommend", json={"user_id": "u1", "k": 3}, headers=headers)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 3
        assert answer.headers["x-shoprank-replica"]  # the app's own headers come through
        assert len(answer.headers.get_list("date")) == 1  # and the edge's do not double them
        assert client.post(edge + "/recommend", json={"user_id": "u1"}).status_code == 401
        assert client.delete(edge + "/recommend", headers=headers).status_code == 405
        for path, body, status, says in HOSTILE:
            got = client.post(edge + path, content=body, headers=headers)
            assert (got.status_code, path) == (status, path) and says in got.text, got.text

        def chunks():
            for _ in range(64):
                yield b"x" * 16_384

        chunked = client.post(edge + "/score", content=chunks(), headers=headers)
        assert chunked.status_code == 413 and "limit" in chunked.text


def test_fuzz_from_the_openapi_schema(app):
    """Thousands of requests generated by schemathesis from the app's own OpenAPI schema (valid
    bodies, schema-violating bodies, random keys), sent over HTTP to the Serve app: no answer
    is a 5xx, every 4xx gives its reason, no key is ever echoed."""
    from collections import Counter

    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    url, *_ = app
    schema = schemathesis.openapi.from_dict(get(url, "/openapi.json").json())
    statuses: Counter[tuple[str, int]] = Counter()
    plan = [  # (path, method, mode, send the real key, examples)
        *[
            (p, "POST", GenerationMode.POSITIVE, True, 320)
            for p in ("/recommend", "/search", "/score")
        ],
        *[
            (p, "POST", GenerationMode.NEGATIVE, True, 320)
            for p in ("/recommend", "/search", "/score")
        ],
        *[
            (p, "POST", GenerationMode.POSITIVE, False, 60)
            for p in ("/recommend", "/search", "/score")
        ],
        ("/feedback", "POST", GenerationMode.POSITIVE, True, 100),
        ("/feedback", "POST", GenerationMode.NEGATIVE, True, 100),
        ("/feedback", "POST", GenerationMode.POSITIVE, False, 20),
        ("/version", "GET", GenerationMode.POSITIVE, True, 20),
        ("/healthz", "GET", GenerationMode.POSITIVE, False, 20),
    ]
    session = requests.Session()
    for path, method, mode, keyed, n in plan:
        operation = schema[path][method]
        strategy = operation.as_strategy(mode, headers={"x-api-key": KEY} if keyed else None)

        @settings(
            max_examples=n,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def check(case):
            response = case.call(base_url=url, session=session, timeout=60)
            statuses[(case.operation.label, response.status_code)] += 1
            assert response.status_code < 500, (case.body, response.text)
            assert KEY not in response.text
            if response.status_code >= 400:
                assert response.json()["detail"], response.text

        check()
    total = sum(statuses.values())
    by_status = Counter()
    for (_, status), n in statuses.items():
        by_status[status] += n
    print(f"\nfuzz: {total} requests, by status {dict(sorted(by_status.items()))}")
    assert total >= 2000 and not any(s >= 500 for s in by_status)
    assert by_status[200] > 300 and by_status[422] > 300 and by_status[401] > 50


def test_model_replica_killed_under_load_is_replaced(app, tiny_shop):
    """SIGKILL to the model replica under closed-loop load from CLIENTS clients: Serve starts a
    new one by itself; the only failed requests are ones in flight at the kill (at most one per
    client), and every request sent after the kill is answered with 200."""
    import os
    import signal

    import ray
    from ray.util.state import list_actors

    url, _ = app
    user, _ = _known_user(tiny_shop)
    clients = 4
    answers: list[tuple[float, float, int]] = []  # (sent, answered, status; 0 = no answer)
    stop = threading.Event()

    def closed_loop() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                sent = time.time()
                try:
                    status = client.post(
                        url + "/recommend",
                        json={"user_id": user, "k": 5},
                        headers={"x-api-key": KEY},
                    ).status_code
                except httpx.HTTPError:
                    status = 0
                answers.append((sent, time.time(), status))

    def replicas() -> list:
        # This session's cluster by its address: another Ray on the host (a job, a bench) would
        # leave the state API's own lookup ambiguous.
        here = ray.get_runtime_context().gcs_address
        alive = list_actors(address=here, filters=[("state", "=", "ALIVE")], limit=10_000)
        return [
            a
            for a in alive
            if a.class_name.startswith("ServeReplica:shoprank:")
            and not a.class_name.endswith(":Ingress")
        ]

    threads = [threading.Thread(target=closed_loop, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        (victim,) = replicas()
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.time()
        deadline = killed_at + 120
        while not any(a.actor_id != victim.actor_id for a in replicas()):
            assert time.time() < deadline, "Serve did not start a new model replica"
            time.sleep(0.5)
        replaced_at = time.time()
        while not any(sent > replaced_at and status == 200 for sent, _, status in answers):
            assert time.time() < deadline, "no request succeeded after the new replica started"
            time.sleep(0.2)
        time.sleep(2)  # and the new replica keeps serving
    finally:  # the clients stop whatever happened (else they outlive the test, and pytest)
        stop.set()
        for t in threads:
            t.join()

    failed = [(sent, answered, status) for sent, answered, status in answers if status != 200]
    in_flight = [a for a in answers if a[0] <= killed_at <= a[1]]
    print(
        f"\nreplica killed under load: {len(answers)} requests, {len(failed)} failed "
        f"({sorted({s for *_, s in failed})}), {len(in_flight)} in flight at the kill, "
        f"new replica after {replaced_at - killed_at:.1f} s"
    )
    assert all(sent <= killed_at for sent, _, _ in failed), failed
    assert len(failed) <= len(in_flight) <= clients
    after = [status for sent, _, status in answers if sent > killed_at]
    assert after and set(after) == {200}
