"""The floor for a lone request: an empty Litestar app on the same uvicorn, no model.

    .venv/bin/python bench/floor_server.py PORT

One ``POST /v1/embeddings`` route that decodes the same JSON body into a msgspec struct and
answers a fixed 384-float embedding in the OpenAI shape, plus ``GET /v2/health/ready``.
uvicorn runs with the settings ``modelyard serve`` uses (httptools, uvloop, no access log,
the same garbage-collector tuning), so the difference between this app's round trip and
modelyard's is what modelyard itself adds: auth, limits, the batcher, the thread hops,
telemetry. ``bench/onnx_embeddings.py`` starts it and pairs it with bare calls exactly as it
pairs modelyard.
"""

from __future__ import annotations

import random
import sys

import msgspec
import uvicorn
from litestar import Litestar, Response, get, post

from modelyard.api.server import tune_gc


class EmbeddingBody(msgspec.Struct):
    model: str
    input: str | list[str]


def create_floor_app(dim: int = 384) -> Litestar:
    rng = random.Random(0)
    raw = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = sum(x * x for x in raw) ** 0.5
    vector = [x / norm for x in raw]  # floats with full digits: the same JSON work as a real one

    @post("/v1/embeddings", status_code=200)
    async def embeddings(data: EmbeddingBody) -> Response[dict[str, object]]:
        texts = [data.input] if isinstance(data.input, str) else data.input
        return Response({
            "object": "list", "model": data.model,
            "data": [{"object": "embedding", "index": i, "embedding": vector}
                     for i in range(len(texts))],
            "usage": {"prompt_tokens": 16, "total_tokens": 16},
        })

    @get("/v2/health/ready")
    async def ready() -> dict[str, bool]:
        return {"ready": True}

    return Litestar([embeddings, ready], logging_config=None, debug=False)


def main() -> None:
    port = int(sys.argv[1])
    config = uvicorn.Config(
        create_floor_app(), host="127.0.0.1", port=port, http="httptools",
        log_level="warning", access_log=False, lifespan="on", log_config=None,
    )
    tune_gc()
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
