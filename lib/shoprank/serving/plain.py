"""The benchmark's baseline: the same routes, models and rules in one plain process (FastAPI on
uvicorn, torch in a thread pool, no Ray, no batching across requests).

    python -m shoprank.serving.plain --args ARGS.json --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json

from fastapi import FastAPI

from shoprank.serving import services
from shoprank.serving.frontend import Backends, Frontend, api, install, stage_two_words
from shoprank.serving.schemas import AppArgs


def create(args: AppArgs) -> FastAPI:
    import os

    services.use_threads(args.torch_threads or os.cpu_count() or 1)
    retriever, ranker = services.from_args(args)

    async def score(*request) -> dict:
        return (await asyncio.to_thread(ranker.score_many, [request]))[0]

    async def versions() -> dict[str, int | None]:
        return {"retriever": retriever.version(), "ranker": ranker.version() if ranker else None}

    async def describe() -> dict:
        return stage_two_words(services.describe_models(retriever, ranker), args)

    backends = Backends(
        retrieve=lambda *a: asyncio.to_thread(retriever.retrieve, *a),
        score=score if ranker else None,
        versions=versions,
        describe=describe,
    )
    install(Frontend(args, backends, with_metrics=False))
    return api


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--args", required=True, help="JSON file with the app's args")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    cli = parser.parse_args()
    with open(cli.args) as f:
        app = create(AppArgs.model_validate(json.load(f)))
    uvicorn.run(app, host=cli.host, port=cli.port, log_level="warning")


if __name__ == "__main__":
    main()
