"""The floor and the reference for a lone request: Litestar apps on the same uvicorn.

    .venv/bin/python bench/floor_server.py PORT [--model DIR]

One ``POST /v1/embeddings`` route that decodes the same JSON body into a msgspec struct and
answers in the OpenAI shape, plus ``GET /v2/health/ready``. uvicorn runs with the settings
``modelyard serve`` uses (httptools, uvloop, no access log, the same garbage-collector
tuning). ``bench/onnx_embeddings.py`` starts both kinds and pairs them with bare calls
exactly as it pairs modelyard:

- the *floor* (no ``--model``): a fixed 384-float embedding, no model. What any Litestar
  server pays for one request on this machine.
- the *reference* (``--model DIR``): the bench's own bare call (tokenise, ``session.run``,
  mean-pool, normalise) on one thread of its own, the way a server keeps the event loop free
  while a model runs. The least a Litestar server that runs the model off its event loop can
  do; the difference between its round trip and modelyard's is what modelyard itself adds:
  auth, limits, the batcher, telemetry, the disconnect watcher.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import uvicorn
from litestar import Litestar, Response, get, post

from modelyard.api.server import tune_gc

Embed = Callable[[list[str]], list[list[float]]]


class EmbeddingBody(msgspec.Struct):
    model: str
    input: str | list[str]


def fixed_embedder(dim: int = 384) -> Embed:
    """One unit vector for every text, with full-precision floats: the same JSON work as a
    real embedding, and no model."""
    rng = random.Random(0)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in raw) ** 0.5
    vector = [x / norm for x in raw]
    return lambda texts: [vector] * len(texts)


def create_floor_app(embed: Embed | None = None, *, off_loop: bool = False) -> Litestar:
    """The app; ``embed`` defaults to the fixed vector. ``off_loop``: call ``embed`` on a
    thread of the app's own (one, kept warm), as a server does with a model run."""
    embedder = embed or fixed_embedder()
    threads = ThreadPoolExecutor(1, thread_name_prefix="reference") if off_loop else None

    async def shutdown() -> None:
        if threads is not None:
            threads.shutdown(wait=False)

    @post("/v1/embeddings", status_code=200)
    async def embeddings(data: EmbeddingBody) -> Response[dict[str, object]]:
        texts = [data.input] if isinstance(data.input, str) else data.input
        if threads is None:
            vectors = embedder(texts)
        else:
            vectors = await asyncio.get_running_loop().run_in_executor(threads, embedder, texts)
        return Response({
            "object": "list", "model": data.model,
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i, vector in enumerate(vectors)],
            "usage": {"prompt_tokens": 16, "total_tokens": 16},
        })

    @get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return Litestar(
        [embeddings, ready], on_shutdown=[shutdown], logging_config=None, debug=False
    )


def create_reference_app(model_dir: Path) -> Litestar:
    """The floor app doing the bench's bare call (spin-waiting off, as the backend runs it)
    on a thread of its own."""
    sys.path.insert(0, str(Path(__file__).parent))
    from onnx_embeddings import bare_call

    return create_floor_app(bare_call(model_dir, spin=False), off_loop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--model", type=Path, default=None, help="serve this model directory")
    args = parser.parse_args()
    app = create_floor_app() if args.model is None else create_reference_app(args.model)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=args.port, http="httptools",
        log_level="warning", access_log=False, lifespan="on", log_config=None,
    )
    tune_gc()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
