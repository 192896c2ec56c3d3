"""The door every HTTP request passes before FastAPI parses it.

In order: the API key (so that a request without one gets 401 whatever its body), the docs
switch, then for JSON bodies the content type, the size limit (counted as the bytes arrive, so
a chunked upload is held to it as well as one with a Content-Length) and a strict reading of the
JSON: UTF-8 only, no NaN/Infinity literals or numbers that overflow to infinity, no lone
surrogates, bounded nesting. What it refuses gets a 4xx whose `detail` says what to change and
never repeats the request's values; what it lets through is replayed to FastAPI unchanged.

It also counts every answer, whatever its status, in the frontend's metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from shoprank.serving.auth import HEADER

Scope = dict
Message = dict
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_DEPTH = 16  # the API's bodies nest 3 deep; anything past this is not a request of ours
OPEN = frozenset({"/healthz"})  # everything else that exists needs a key
DOCS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
JSON_BODIES = frozenset({"/recommend", "/search", "/score", "/feedback"})


class Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _no_constants(name: str) -> float:
    raise Refused(400, f"the body holds {name}: JSON numbers must be finite")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Refused(400, "the body holds a number too large for a float: send finite numbers")
    return value


def _check_strings(value, depth: int = 0) -> None:
    """Lone surrogates cannot be encoded as UTF-8 (nor logged, tokenized or answered)."""
    if depth > MAX_DEPTH:
        raise Refused(400, f"the body nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused(
                400, "the body holds a lone UTF-16 surrogate (\\ud800-\\udfff): send valid text"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_strings(k, depth + 1)
            _check_strings(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_strings(v, depth + 1)


def read_json(body: bytes) -> object:
    """The body as the API accepts it, or Refused(400) saying why not."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Refused(400, f"the body is not UTF-8 (byte {err.start}): send UTF-8 JSON") from None
    try:
        value = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
    except json.JSONDecodeError as err:
        raise Refused(
            400, f"the body is not JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except RecursionError:
        raise Refused(400, f"the body nests deeper than {MAX_DEPTH} levels") from None
    except ValueError:  # e.g. an integer of more than 4300 digits
        raise Refused(400, "the body holds a number too long to read: send shorter ones") from None
    _check_strings(value)
    return value


async def _reply(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Gate:
    """ASGI middleware around the routes (see the module docstring). `frontend` returns the
    installed Frontend or None while the app starts."""

    def __init__(self, app, frontend: Callable[[], object | None], max_body: int):
        self.app, self.frontend, self.max_body = app, frontend, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        front = self.frontend()
        path = scope["path"]
        try:
            if front is None:
                raise Refused(503, "the app is starting: try again in a few seconds")
            receive = await self._admit(front, scope, receive)
        except Refused as no:
            await _reply(counted, no.status, no.detail)
        else:
            await self.app(scope, receive, counted)
        finally:
            if front is not None:
                front.observe(_endpoint(path), status[0], started)

    async def _admit(self, front, scope: Scope, receive: Receive) -> Receive:
        """The request's `receive` (its body replayed) if it may go on; else Refused."""
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        if path in DOCS and not front.args.docs:
            raise Refused(404, "Not Found")  # as any unknown path: docs are off in this app
        if path not in OPEN and path not in DOCS:
            key = headers.get(HEADER)
            if not front.keys.valid(key.decode("latin-1") if key else None):
                raise Refused(401, f"missing or invalid API key: send it in the {HEADER} header")
        if path not in JSON_BODIES or scope["method"] != "POST":
            return receive
        kind = headers.get("content-type", b"").decode("latin-1").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(415, "send the body as JSON with Content-Type: application/json")
        size = headers.get("content-length", b"").decode("latin-1")
        if size.isdigit() and int(size) > self.max_body:
            raise Refused(413, f"the body is over the {self.max_body}-byte limit")
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise Refused(400, "the client went away before sending the whole body")
            body += message.get("body", b"")
            if len(body) > self.max_body:
                raise Refused(413, f"the body is over the {self.max_body}-byte limit")
            if not message.get("more_body", False):
                break
        read_json(bytes(body))
        return _replay(bytes(body), receive)


def _endpoint(path: str) -> str:
    """The metrics label: a route's name, or "other" (paths are the client's to invent)."""
    return path.lstrip("/") if path in JSON_BODIES | OPEN | {"/version"} else "other"


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _safe(value):
    """A location part as JSON can carry it (a key may be anything the client sent)."""
    if isinstance(value, int):
        return value
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")[:300]


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each field and what is wrong, without echoing the values sent."""
    detail = [
        {
            "loc": [_safe(p) for p in e.get("loc", ())],
            "msg": _safe(e.get("msg", "")),
            "type": e["type"],
        }
        for e in exc.errors()
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def guard(app: FastAPI, frontend: Callable[[], object | None], max_body: int) -> None:
    app.add_middleware(Gate, frontend=frontend, max_body=max_body)
    app.add_exception_handler(RequestValidationError, validation_error)
