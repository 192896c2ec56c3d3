"""Hostile requests against the HTTP routes (in-process, through the same gate and handlers as
the Serve app): every one gets a 4xx with a reason, never a 5xx, never an echo of a key."""

from __future__ import annotations

import os

import pytest

from conftest import serving_setup

KEY = "hardening-key-7"
JSON = {"x-api-key": KEY, "content-type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_shop, tiny_model_dir):
    from fastapi.testclient import TestClient

    from shoprank.serving.plain import create
    from shoprank.serving.schemas import AppArgs

    setup = serving_setup(tmp_path_factory.mktemp("hard"), tiny_shop, tiny_model_dir, KEY)
    args = {**setup.args, "ranker_precision": "fp32"}
    app = create(AppArgs.model_validate(args))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c, setup


BIG_LIST = '{"context": "x", "item_ids": [' + ",".join(['"a"'] * 10_000) + "]}"


# (path, raw body, status, a word the reason must hold); tests/test_serve.py sends them over HTTP
HOSTILE = [
    ("/recommend", b'{"user_id": "u", "k": NaN}', 400, "NaN"),
    ("/recommend", b'{"user_id": "u", "colour": -Infinity}', 400, "-Infinity"),
    ("/search", b'{"query": "x", "filters": {"max_price": Infinity}}', 400, "Infinity"),
    ("/search", b'{"query": "x", "filters": {"max_price": 1e400}}', 400, "too large"),
    ("/score", b'{"context": "x", "item_ids": ["a", 1e999]}', 400, "too large"),
    ("/recommend", b'{"user_id": "\\ud800"}', 400, "surrogate"),
    ("/search", b'{"query": "pens \\udfff"}', 400, "surrogate"),
    ("/score", b'{"context": "x", "item_ids": ["\\ud834"]}', 400, "surrogate"),
    ("/recommend", b'{"\\udc00": 1, "user_id": "u"}', 400, "surrogate"),
    ("/recommend", b'{"user_id": "\xff\xfe\xfd"}', 400, "UTF-8"),
    ("/recommend", b"user_id=u", 400, "not JSON"),
    ("/recommend", b"", 400, "not JSON"),
    ("/score", b"[" * 20_000 + b"]" * 20_000, 400, "nests deeper"),
    ("/score", b'{"a":' * 100 + b"1" + b"}" * 100, 400, "nests deeper"),
    ("/recommend", b'{"user_id": "u", "k": ' + b"9" * 5000 + b"}", 400, "too long"),
    ("/score", BIG_LIST.encode(), 422, "at most 200"),
    ("/recommend", b'{"user_id": "u", "k": 1e308}', 422, "k"),
    ("/recommend", b"[]", 422, "body"),
    ("/recommend", b'"just a string"', 422, "body"),
    ("/recommend", b"null", 422, "body"),
    ("/search", b'{"query": "x", "filters": {"max_price": -1}}', 422, "max_price"),
]


@pytest.mark.parametrize("path, body, status, says", HOSTILE)
def test_hostile_bodies_get_a_4xx_with_a_reason(client, path, body, status, says):
    c, _ = client
    got = c.post(path, content=body, headers=JSON)
    assert got.status_code == status, got.text
    assert says in got.text
    assert KEY not in got.text


def test_an_invalid_body_is_never_echoed(client):
    c, _ = client
    secret = "user-email@example.com"
    got = c.post("/recommend", json={"user_id": secret, "k": "ten", "history": [secret]})
    assert got.status_code in (401, 422)
    got = c.post("/recommend", json={"user_id": secret, "k": "ten"}, headers=JSON)
    assert got.status_code == 422 and secret not in got.text
    assert got.json()["detail"][0]["loc"] == ["body", "k"]


def test_content_type_method_and_key_order(client):
    c, _ = client
    plain = {"x-api-key": KEY, "content-type": "text/plain"}
    assert c.post("/recommend", content=b'{"user_id": "u"}', headers=plain).status_code == 415
    assert c.get("/recommend", headers=JSON).status_code == 405
    assert c.put("/score", content=b"{}", headers=JSON).status_code == 405
    # The key is checked before the body is read: no key and garbage is 401, not 400/422.
    garbage = {"content-type": "application/json"}
    assert c.post("/recommend", content=b"\xff{", headers=garbage).status_code == 401
    wrong = c.post("/recommend", json={"user_id": "u"}, headers={"x-api-key": KEY[:-1]})
    assert wrong.status_code == 401 and KEY[:-1] not in wrong.text
    # A key with bytes outside ASCII is just a wrong key.
    odd = c.post("/recommend", json={"user_id": "u"}, headers={"x-api-key": "clé".encode()})
    assert odd.status_code == 401


def test_open_endpoints_reveal_nothing(client):
    c, setup = client
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/version").status_code == 401
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert c.get(path).status_code == 404  # docs are off unless the app's args say docs
    # A broken rules edit: /healthz says degraded without why; /version (with a key) says why.
    before = setup.rules.read_text()
    setup.rules.write_text("filters: {out_of_stock: sometimes}\n")
    os.utime(setup.rules, ns=(1, 3 * 10**18))
    try:
        assert c.post("/recommend", json={"user_id": "u"}, headers=JSON).status_code == 200
        health = c.get("/healthz").json()
        assert health["status"] == "degraded" and "sometimes" not in str(health)
        assert "out_of_stock" in c.get("/version", headers=JSON).json()["rules_error"]
    finally:
        setup.rules.write_text(before)
        os.utime(setup.rules, ns=(1, 4 * 10**18))
    c.post("/recommend", json={"user_id": "u"}, headers=JSON)
    assert c.get("/healthz").json() == {"status": "ok"}


def test_every_answer_is_counted_with_its_status(client, monkeypatch):
    from shoprank.serving.frontend import installed

    c, _ = client
    seen = []
    monkeypatch.setattr(installed(), "observe", lambda e, s, t: seen.append((e, s)))
    c.post("/recommend", json={"user_id": "u"}, headers=JSON)
    c.post("/recommend", json={"user_id": "u"})
    c.post("/recommend", json={"user_id": "u", "k": 0}, headers=JSON)
    c.post("/score", content=b"NaN", headers=JSON)
    c.get("/no/such/path/../../etc/passwd", headers=JSON)
    expected = [("recommend", 200), ("recommend", 401), ("recommend", 422), ("score", 400)]
    assert seen == [*expected, ("other", 404)]


def test_redact_hides_credentials():
    from shoprank.console import redact

    assert redact("registry") == "registry"
    assert redact("s3://AKIA:SECRET@bucket/reg") == "s3://***@bucket/reg"
    got = redact("gs://bucket/reg?access_key=AK&secret_key=SK&region=eu")
    assert "AK" not in got and "SK" not in got and "region=eu" in got


def test_user_ids_are_hashed_with_a_secret(monkeypatch, tmp_path):
    import hashlib

    from shoprank.serving import auth

    monkeypatch.setenv(auth.USER_KEY_ENV, "secret-one")
    auth.reset_user_key()
    one = auth.hash_user("A2SUAM1J3GNN3B")
    assert one == auth.hash_user("A2SUAM1J3GNN3B") != auth.hash_user("A2SUAM1J3GNN3C")
    plain = hashlib.sha256(b"A2SUAM1J3GNN3B").hexdigest()
    assert one[2:] not in plain  # not the unkeyed hash anyone could compute
    (tmp_path / "k").write_text("secret-two\n")
    monkeypatch.delenv(auth.USER_KEY_ENV)
    monkeypatch.setenv(auth.USER_KEY_FILE_ENV, str(tmp_path / "k"))
    auth.reset_user_key()
    assert auth.hash_user("A2SUAM1J3GNN3B") != one
    assert auth.hash_user("\ud800") != one  # a lone surrogate hashes too
    auth.reset_user_key()
