"""Models served over Ray Serve through modelyard's ingress: the same API, the same clients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from openai import OpenAI

from conftest import Ingress, StartIngress, replica_pids
from modelyard.testing import wait_until
from modelyard.testing.backends import fake_embedding


def _tensor_model(path: Path) -> Path:
    """Y = X * 2 (FP32 [N, 3]), batched on axis 0."""
    from onnx import TensorProto, helper, save_model

    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "two"], ["Y"])], "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["N", 3])], [two],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, str(path))
    return path


@pytest.fixture(scope="module")
def ingress(start_ingress: StartIngress, tmp_path_factory: pytest.TempPathFactory) -> Ingress:
    tensor = _tensor_model(tmp_path_factory.mktemp("onnx") / "model.onnx")
    broken = tmp_path_factory.mktemp("broken") / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    return start_ingress(f'''
[[models]]
name = "echo"
backend = "echo"
source = "."
task = "chat"
replicas = 2

[[models]]
name = "embed"
backend = "echo"
source = "."
task = "embeddings"
options = {{ dim = 8 }}

[[models]]
name = "doubler"
backend = "onnx"
source = "{tensor}"
task = "tensor"

[[models]]
name = "smollm2"
backend = "gguf"
source = "demo:smollm2-135m-instruct"
task = "chat"
options = {{ n_ctx = 512 }}

[[models]]
name = "broken"
backend = "gguf"
source = "{broken}"
task = "completion"
required = false
''')


@pytest.fixture(scope="module")
def openai_client(ingress: Ingress) -> OpenAI:
    return OpenAI(base_url=f"{ingress.url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_chat_embeddings_and_streaming(openai_client: OpenAI) -> None:
    reply = openai_client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "over ray"}]
    )
    assert reply.choices[0].message.content == "over ray"
    embedded = openai_client.embeddings.create(model="embed", input=["a", "b"])
    for item, text in zip(embedded.data, ["a", "b"], strict=True):
        assert item.embedding == pytest.approx(fake_embedding(text, 8))
    chunks = list(openai_client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "one two three"}], stream=True
    ))
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3  # token by token through the replica, not one buffered answer
    assert "".join(pieces).split() == ["one", "two", "three"]


def test_a_real_gguf_model_streams_over_ray(openai_client: OpenAI) -> None:
    chunks = list(openai_client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8,
        temperature=0, stream=True,
    ))
    pieces = [c.choices[0].delta.content for c in chunks
              if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_tritonclient_on_an_onnx_model(ingress: Ingress) -> None:
    host = ingress.url.removeprefix("http://")
    client = httpclient.InferenceServerClient(url=host, network_timeout=60)
    try:
        matrix = np.arange(6, dtype=np.float32).reshape(2, 3)
        x = httpclient.InferInput("X", [2, 3], "FP32")
        x.set_data_from_numpy(matrix)
        result = client.infer("doubler", [x])
        np.testing.assert_allclose(result.as_numpy("Y"), matrix * 2)
        assert client.is_model_ready("doubler")
    finally:
        client.close()


def test_each_version_runs_in_its_named_replicas(ingress: Ingress, namespace: str) -> None:
    assert len(replica_pids(f"{namespace}-echo-1")) == 2  # replicas = 2
    assert len(replica_pids(f"{namespace}-embed-1")) == 1
    assert ingress.process.pid not in replica_pids(f"{namespace}-echo-1")


def test_a_model_that_cannot_load_is_failed_with_its_error(ingress: Ingress) -> None:
    with ingress.client() as http:

        def broken_row() -> dict[str, str]:
            index = http.post("/v2/repository/index", json={}).json()
            return next(row for row in index if row["name"] == "broken")

        # Serve tries the constructor a few times before it gives the version up.
        wait_until(lambda: broken_row()["state"] != "LOADING", "the broken model to settle",
                   timeout=180, interval=0.5)
        broken = broken_row()
        assert broken["state"] == "UNAVAILABLE"
        assert broken["reason"]  # the replica's own load error, not a Ray traceback
        assert "Traceback" not in broken["reason"]
        assert http.get("/v2/health/ready").status_code == 200  # not required
        problem = http.post("/v1/completions", json={"model": "broken", "prompt": "x"})
        assert problem.status_code == 503
        assert problem.headers["content-type"].startswith("application/problem+json")


def test_replica_metrics_reach_one_scrape(ingress: Ingress, namespace: str) -> None:
    with ingress.client() as http:
        http.post("/v1/embeddings", json={"model": "embed", "input": "x"})

        def scraped() -> bool:
            body = http.get("/metrics").text
            return "modelyard_replica_" in body and 'replica="embed:1:' in body

        wait_until(scraped, "replica metrics in the ingress's scrape", timeout=60, interval=0.5)
