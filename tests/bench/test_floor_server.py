"""bench/floor_server.py: the empty Litestar app the ONNX bench pairs with modelyard.

The lone-request floor only means something if the app does the same HTTP work as
modelyard's route: decode the same body, answer the same OpenAI shape with 384 floats.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

from litestar.testing import TestClient

FLOOR = Path(__file__).parents[2] / "bench" / "floor_server.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("floor_server", FLOOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Litestar resolves the handlers' annotations through it
    spec.loader.exec_module(module)
    return module


def test_floor_app_answers_an_openai_embedding() -> None:
    app = _load().create_floor_app()
    with TestClient(app) as client:
        assert client.get("/v2/health/ready").status_code == 200
        body = json.dumps({"model": "all-minilm-l6-v2", "input": "river mountain"})
        response = client.post(
            "/v1/embeddings", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 200
        answer = response.json()
        assert answer["object"] == "list" and answer["model"] == "all-minilm-l6-v2"
        (item,) = answer["data"]
        assert item["object"] == "embedding" and item["index"] == 0
        assert len(item["embedding"]) == 384
        assert math.isclose(math.fsum(x * x for x in item["embedding"]), 1.0, rel_tol=1e-9)
        # Two inputs, two vectors: the same per-item JSON work as modelyard's answer.
        two = client.post("/v1/embeddings", json={"model": "m", "input": ["a", "b"]}).json()
        assert [d["index"] for d in two["data"]] == [0, 1]


def test_floor_app_refuses_a_malformed_body() -> None:
    app = _load().create_floor_app()
    with TestClient(app) as client:
        response = client.post("/v1/embeddings", json={"input": "no model"})
        assert response.status_code == 400
