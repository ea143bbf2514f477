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
from typing import Any

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


def _tiny_encoder(root: Path, dim: int = 8) -> tuple[Path, dict[str, int], Any]:
    """A model directory the bare call can run: a WordLevel tokenizer.json and a graph whose
    ``last_hidden_state`` is each token's row of a random table (the other inputs unused)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[PAD]": 0, "[UNK]": 1, "river": 2, "mountain": 3, "quiet": 4, "engine": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(root / "tokenizer.json"))
    table = np.random.default_rng(0).standard_normal((len(vocab), dim)).astype(np.float32)
    ids = ["input_ids", "attention_mask", "token_type_ids"]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["last_hidden_state"])],
        "tiny",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in ids],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["b", "s", dim])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(root / "model.onnx"))
    return root, vocab, table


def test_reference_app_runs_the_bare_call_off_the_loop(tmp_path: Path) -> None:
    """The reference does the model's real work: the vectors are the mean of each text's own
    token rows (padding masked out), normalised."""
    import numpy as np

    model_dir, vocab, table = _tiny_encoder(tmp_path)
    app = _load().create_reference_app(model_dir)
    texts = ["river quiet engine", "mountain"]  # the second is padded to the first's length
    with TestClient(app) as client:
        response = client.post("/v1/embeddings", json={"model": "tiny", "input": texts})
        assert response.status_code == 200
        got = np.array([d["embedding"] for d in response.json()["data"]])
        bad = client.post("/v1/embeddings", json={"input": "no model"})
        assert bad.status_code == 400
    for row, text in zip(got, texts, strict=True):
        mean = table[[vocab[w] for w in text.split()]].mean(axis=0)
        np.testing.assert_allclose(row, mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_off_loop_embedder_runs_on_the_apps_own_thread() -> None:
    """The reference keeps its event loop free: the model call runs on the app's thread."""
    import threading

    seen: list[str] = []

    def embed(texts: list[str]) -> list[list[float]]:
        seen.append(threading.current_thread().name)
        return [[1.0] for _ in texts]

    floor = _load()
    with TestClient(floor.create_floor_app(embed, off_loop=True)) as client:
        for _ in range(2):
            assert client.post("/v1/embeddings", json={"model": "m", "input": "a"}).json()[
                "data"
            ][0]["embedding"] == [1.0]
    with TestClient(floor.create_floor_app(embed)) as client:
        client.post("/v1/embeddings", json={"model": "m", "input": "a"})
    assert seen[0] == seen[1] and seen[0].startswith("reference")  # one warm thread
    assert not seen[2].startswith("reference")
