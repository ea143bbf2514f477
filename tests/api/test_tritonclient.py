"""``tritonclient[http]`` against a real uvicorn server (Open Inference Protocol v2)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from modelyard.testing import LiveServer
from modelyard.testing.backends import fake_embedding


@pytest.fixture(scope="module")
def client(live_echo: LiveServer) -> Iterator[httpclient.InferenceServerClient]:
    c = httpclient.InferenceServerClient(
        url=f"{live_echo.host}:{live_echo.port}", connection_timeout=30, network_timeout=30
    )
    try:
        yield c
    finally:
        c.close()


def _matrix() -> np.ndarray:
    return np.arange(6, dtype=np.float32).reshape(2, 3) - 1.5


def test_server_health_and_metadata(client: httpclient.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "modelyard"
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_and_readiness(client: httpclient.InferenceServerClient) -> None:
    meta = client.get_model_metadata("doubler")
    assert meta["name"] == "doubler"
    assert [i["name"] for i in meta["inputs"]] == ["INPUT0"]
    assert [o["name"] for o in meta["outputs"]] == ["OUTPUT0"]
    assert meta["inputs"][0]["datatype"] == "FP32"
    assert client.get_model_metadata("doubler", model_version="1")["versions"] == ["1"]
    assert client.is_model_ready("doubler")
    assert client.is_model_ready("doubler", model_version="1")
    assert not client.is_model_ready("nope")


def test_infer_with_binary_inputs_and_outputs(client: httpclient.InferenceServerClient) -> None:
    data = _matrix()
    tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)  # binary_data=True by default
    wanted = httpclient.InferRequestedOutput("OUTPUT0", binary_data=True)
    result = client.infer("doubler", [tensor], outputs=[wanted], request_id="r1")
    out = result.as_numpy("OUTPUT0")
    assert out is not None and out.dtype == np.float32
    np.testing.assert_array_equal(out, data * 2)
    assert result.get_response()["id"] == "r1"


def test_infer_with_no_outputs_named_returns_them_all_binary(
    client: httpclient.InferenceServerClient,
) -> None:
    data = _matrix()
    tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("doubler", [tensor])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2)


def test_infer_with_json_tensors(client: httpclient.InferenceServerClient) -> None:
    data = _matrix()
    tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=False)
    wanted = httpclient.InferRequestedOutput("OUTPUT0", binary_data=False)
    result = client.infer("doubler", [tensor], outputs=[wanted])
    output = result.get_output("OUTPUT0")
    assert output is not None and "data" in output  # came back as JSON, not binary
    np.testing.assert_allclose(result.as_numpy("OUTPUT0"), data * 2)


def test_bytes_tensors_into_an_embeddings_model(client: httpclient.InferenceServerClient) -> None:
    texts = np.array([b"first text", b"second"], dtype=np.object_)
    tensor = httpclient.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(texts)
    result = client.infer("echo-embed", [tensor])
    vectors = result.as_numpy("embedding")
    assert vectors is not None and vectors.shape == (2, 16)
    np.testing.assert_allclose(vectors[0], fake_embedding("first text", 16), rtol=1e-6)
    np.testing.assert_allclose(vectors[1], fake_embedding("second", 16), rtol=1e-6)


def test_text_generation_over_bytes(client: httpclient.InferenceServerClient) -> None:
    tensor = httpclient.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"hello triton client"], dtype=np.object_))
    result = client.infer("echo", [tensor], parameters={"max_tokens": 2})
    assert list(result.as_numpy("text_output")) == [b"hello triton"]


def test_repository_index_and_unload_load_round_trip(
    client: httpclient.InferenceServerClient,
) -> None:
    index = {row["name"]: row for row in client.get_model_repository_index()}
    assert set(index) == {"echo", "echo-embed", "doubler"}
    assert index["doubler"]["state"] == "READY"

    client.unload_model("doubler")
    assert not client.is_model_ready("doubler")
    assert not client.is_server_ready()
    after = {row["name"]: row for row in client.get_model_repository_index()}
    assert after["doubler"]["state"] == "UNAVAILABLE"

    client.load_model("doubler")
    assert client.is_model_ready("doubler")
    assert client.is_server_ready()
    tensor = httpclient.InferInput("INPUT0", [1, 1], "FP32")
    tensor.set_data_from_numpy(np.array([[21.0]], dtype=np.float32))
    np.testing.assert_array_equal(client.infer("doubler", [tensor]).as_numpy("OUTPUT0"), [[42.0]])


def test_a_wrong_shape_is_an_exception_with_a_clear_message(
    client: httpclient.InferenceServerClient,
) -> None:
    tensor = httpclient.InferInput("INPUT0", [3], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2, 3], dtype=np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("doubler", [tensor])
    assert caught.value.status() == "400"
    assert caught.value.message() == "input tensor 'INPUT0' has shape [3], expected 2 dimensions"


def test_an_unknown_model_is_an_exception_naming_it(
    client: httpclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "404"
    assert caught.value.message() == "model 'nope' does not exist"
