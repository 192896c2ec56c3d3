"""The edge: a reverse proxy in front of Serve that forwards only the app's own routes.

Serve's HTTP proxy answers some paths itself, before any application sees the request:
`/-/routes` lists every application and its route prefix, `/-/healthz` says whether the proxy is
up, both to anyone who can reach the port, and Serve has no switch to close them. So Serve's
proxy listens on localhost only (serve/config.yaml: `http_options.host: 127.0.0.1`) and this
process listens where clients connect:

    python -m shoprank.serving.edge --listen 0.0.0.0:8080 --upstream http://127.0.0.1:8000

The paths it forwards are the app's routes (`frontend.api`: /recommend, /search, /score,
/feedback, /healthz, /version and the OpenAPI pages), each with the methods the app declares;
anything else is a 404 (a 405 for another method) without reaching Serve. A body over the
app's limit is refused here (413) before it is read whole. The app's own gate still checks the
key, the JSON and the limits. Any reverse proxy with the same allow-list does the same job
(nginx, Envoy, a cloud load balancer's path rules); this one ships with the app and is tested
(tests/test_edge.py).
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from shoprank.serving.schemas import MAX_BODY_BYTES

# Headers about one connection, not the message: never forwarded either way (RFC 9110 7.6.1).
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
}


def app_routes() -> dict[str, set[str]]:
    """path -> methods, as the app declares them."""
    from shoprank.serving.frontend import api

    routes: dict[str, set[str]] = {}
    for route in api.routes:
        path, methods = getattr(route, "path", None), getattr(route, "methods", None)
        if path and methods:
            routes.setdefault(path, set()).update(methods)
    return routes


async def _body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` bytes (declared or sent, chunked or not)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def create_edge(
    upstream: str, routes: dict[str, set[str]] | None = None, limit: int = MAX_BODY_BYTES
) -> Starlette:
    """The edge's ASGI app: `routes` (path -> methods; default the app's) forwarded to
    `upstream`, everything else answered here."""
    routes = app_routes() if routes is None else routes
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=httpx.Timeout(60.0))

    async def forward(request: Request) -> Response:
        path = request.url.path
        if path not in routes:
            return JSONResponse({"detail": "Not Found"}, 404)
        if request.method not in routes[path]:
            return JSONResponse({"detail": "Method Not Allowed"}, 405)
        try:
            body = await _body(request, limit)
        except ClientDisconnect:
            return Response(status_code=400)
        if body is None:
            return JSONResponse({"detail": f"the body is over the limit of {limit} bytes"}, 413)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        if request.client is not None:
            headers.append(("x-forwarded-for", request.client.host))
        sent = client.build_request(
            request.method, path, params=request.url.query, headers=headers, content=body
        )
        try:
            got = await client.send(sent, stream=True)
        except httpx.HTTPError:
            return JSONResponse({"detail": "the app is not reachable"}, 502)
        # The raw bytes go back as they came (their length too); uvicorn sets its own date
        # and server.
        drop = (HOP_BY_HOP - {"content-length"}) | {"date", "server"}
        back = {k: v for k, v in got.headers.items() if k.lower() not in drop}
        return StreamingResponse(
            got.aiter_raw(), got.status_code, headers=back, background=BackgroundTask(got.aclose)
        )

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)


def main() -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--listen", default="0.0.0.0:8080", help="host:port clients connect to")
    p.add_argument("--upstream", default="http://127.0.0.1:8000", help="Serve's HTTP proxy")
    cli = p.parse_args()
    host, _, port = cli.listen.rpartition(":")
    uvicorn.run(create_edge(cli.upstream), host=host or "0.0.0.0", port=int(port))


if __name__ == "__main__":
    main()
