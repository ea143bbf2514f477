"""Open Inference Protocol v2: health, metadata, JSON and binary tensors, repository."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

import pytest

from modelyard import hookimpl
from modelyard.core.plugins import PluginHost
from modelyard.testing import HangingBackend
from modelyard.testing.backends import fake_embedding

HEADER = "Inference-Header-Content-Length"


def _model(
    name: str, backend: str = "echo", task: str | None = "tensor", **extra: Any
) -> dict[str, Any]:
    return {"name": name, "backend": backend, "source": ".", "task": task, **extra}


@pytest.fixture
async def api(start_api: Any) -> Any:
    return await start_api(
        _model("doubler"),
        _model("chat", task="chat", version="2"),
        _model("embed", task="embeddings", options={"dim": 4}),
        _model("cls", task="classification"),
        _model("broken", backend="failing", options={"fail_on_load": True}, required=False),
    )


def _input0(shape: list[int], data: Any, datatype: str = "FP32") -> dict[str, Any]:
    return {"inputs": [{"name": "INPUT0", "datatype": datatype, "shape": shape, "data": data}]}


def _binary_request(head: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    encoded = json.dumps(head).encode()
    return encoded + b"".join(blobs), {
        HEADER: str(len(encoded)),
        "content-type": "application/octet-stream",
    }


def _split_binary_response(response: Any) -> tuple[dict[str, Any], bytes]:
    n = int(response.headers[HEADER])
    return json.loads(response.content[:n]), response.content[n:]


# -- health and metadata --------------------------------------------------------------------


async def test_server_metadata_and_liveness(api: Any) -> None:
    meta = (await api.client.get("/v2")).json()
    assert meta["name"] == "modelyard"
    assert {"model_repository", "binary_tensor_data"} <= set(meta["extensions"])
    live = await api.client.get("/v2/health/live")
    assert live.status_code == 200 and live.json() == {"live": True}


async def test_ready_is_503_until_models_load_then_200(
    start_api: Any, problem: Any, plugin_host: PluginHost
) -> None:
    gate = asyncio.Event()

    class SlowLoad(HangingBackend):
        name = "slow-load"

        async def load(self) -> None:
            await gate.wait()

    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register: Any) -> None:
            register(SlowLoad)

    plugin_host.register(Plugin(), name="slow-load")
    try:
        api = await start_api(_model("later", backend="slow-load"), _model("now"), wait=False)
        waiting = await api.client.get("/v2/health/ready")
        assert "waiting for: later" in problem(waiting, 503)["detail"]
        assert waiting.headers["retry-after"] == "5"
        assert (await api.client.get("/v2/health/live")).status_code == 200

        gate.set()
        await api.service.wait_until_loaded()
        ready = await api.client.get("/v2/health/ready")
        assert ready.status_code == 200 and ready.json() == {"ready": True}
    finally:
        plugin_host.unregister("slow-load")


async def test_model_metadata_names_inputs_and_outputs(api: Any) -> None:
    tensor = (await api.client.get("/v2/models/doubler")).json()
    assert tensor["name"] == "doubler"
    assert tensor["versions"] == ["1"]
    assert tensor["platform"] == "echo"
    assert tensor["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}]
    assert tensor["outputs"] == [{"name": "OUTPUT0", "datatype": "FP32", "shape": [-1, -1]}]
    assert tensor["parameters"]["task"] == "tensor"
    assert tensor["parameters"]["fake"] is True  # the backend's own info() parameters

    chat = (await api.client.get("/v2/models/chat/versions/2")).json()
    assert [i["name"] for i in chat["inputs"]] == ["text_input"]
    assert [o["name"] for o in chat["outputs"]] == ["text_output"]

    embed = (await api.client.get("/v2/models/embed")).json()
    assert embed["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert embed["outputs"][0]["name"] == "embedding"

    broken = (await api.client.get("/v2/models/broken")).json()
    assert broken["parameters"]["state"] == "failed"


async def test_model_ready(api: Any, problem: Any) -> None:
    ready = await api.client.get("/v2/models/chat/ready")
    assert ready.status_code == 200
    assert ready.json() == {"name": "chat", "version": "2", "ready": True}
    assert (await api.client.get("/v2/models/chat/versions/2/ready")).status_code == 200
    problem(await api.client.get("/v2/models/broken/ready"), 503)


# -- tensors over JSON ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [[[1, 2, 3], [4, 5, 6]], [1, 2, 3, 4, 5, 6], [1.0, 2.5, 3, 4, 5, 6]],
    ids=["nested", "flat", "mixed-numbers"],
)
async def test_tensor_round_trip_over_json(api: Any, data: Any) -> None:
    response = await api.client.post(
        "/v2/models/doubler/infer", json={"id": "req-7", **_input0([2, 3], data)}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-model-version"] == "1"
    body = response.json()
    assert body["model_name"] == "doubler"
    assert body["model_version"] == "1"
    assert body["id"] == "req-7"
    [output] = body["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("OUTPUT0", "FP32", [2, 3])
    flat = [float(x) for row in data for x in (row if isinstance(row, list) else [row])]
    assert output["data"] == [2 * x for x in flat]


async def test_a_version_can_be_addressed(api: Any) -> None:
    response = await api.client.post(
        "/v2/models/chat/versions/2/infer",
        json={
            "inputs": [
                {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["one two three"]}
            ],
            "parameters": {"max_tokens": 2},
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == "2"
    assert body["outputs"][0]["name"] == "text_output"
    assert body["outputs"][0]["data"] == ["one two"]


async def test_bytes_into_an_embeddings_model(api: Any) -> None:
    response = await api.client.post(
        "/v2/models/embed/infer",
        json={
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["hi", "there"]}
            ],
        },
    )
    assert response.status_code == 200
    [output] = response.json()["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("embedding", "FP32", [2, 4])
    expected = fake_embedding("hi", 4) + fake_embedding("there", 4)
    assert output["data"] == pytest.approx(expected)


async def test_classification_outputs_label_and_score(api: Any) -> None:
    response = await api.client.post(
        "/v2/models/cls/infer",
        json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["ab", "abc"]}],
        },
    )
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"] == ["negative", "positive"]
    assert outputs["score"]["data"] == pytest.approx([0.9, 0.9])


async def test_requested_outputs_are_checked(api: Any, problem: Any) -> None:
    ok = await api.client.post(
        "/v2/models/doubler/infer",
        json={
            **_input0([1, 1], [3]),
            "outputs": [{"name": "OUTPUT0"}],
        },
    )
    assert ok.json()["outputs"][0]["data"] == [6.0]
    unknown = await api.client.post(
        "/v2/models/cls/infer",
        json={
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
            "outputs": [{"name": "logits"}],
        },
    )
    assert "logits" in problem(unknown, 400)["detail"]


RAGGED = (
    "tensor 'INPUT0': nested data is ragged; every row at one depth must have the same length"
)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (_input0([2, 3], [1, 2, 3, 4, 5]), "tensor 'INPUT0': shape [2, 3] needs 6 elements, got 5"),
        (_input0([2, -3], [1]), "tensor 'INPUT0': shape [2, -3] has a negative dimension"),
        (_input0([1, 1], [1], "FP99"), "tensor 'INPUT0': unknown datatype 'FP99'"),
        (_input0([1, 2], [1.5, 2], "INT32"), "tensor 'INPUT0': INT32 data must be integers"),
        (_input0([1, 1], ["x"]), "tensor 'INPUT0': FP32 data must be numbers"),
        (_input0([1, 1], [True], "FP32"), "tensor 'INPUT0': FP32 data must be numbers"),
        (_input0([1, 1], [1], "INT32"), "input tensor 'INPUT0' has datatype INT32, expected FP32"),
        (_input0([3], [1, 2, 3]), "input tensor 'INPUT0' has shape [3], expected 2 dimensions"),
        (
            {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1]}]},
            "tensor 'INPUT0' has no data",
        ),
        (
            {"inputs": [{"name": "OTHER", "datatype": "FP32", "shape": [1], "data": [1]}]},
            "input tensor 'INPUT0' is missing",
        ),
        # Ragged nested data: two elements, like the shape, but no regular shape at all.
        (_input0([1, 2], [[1, [2]]]), RAGGED),
        (_input0([2, 2], [[1, 2], [3]]), RAGGED),
        (_input0([2, 1], [[[1]], [2]]), RAGGED),
    ],
)
async def test_wrong_shape_or_datatype_is_400_naming_the_tensor(
    api: Any, problem: Any, body: dict[str, Any], expected: str
) -> None:
    response = await api.client.post("/v2/models/doubler/infer", json=body)
    assert problem(response, 400)["detail"] == expected


async def test_text_inputs_must_be_bytes(api: Any, problem: Any) -> None:
    response = await api.client.post(
        "/v2/models/embed/infer",
        json={
            "inputs": [{"name": "text", "datatype": "INT32", "shape": [1], "data": [1]}],
        },
    )
    assert problem(response, 400)["detail"] == "tensor 'text' must be BYTES"


# -- binary tensor data extension ---------------------------------------------------------------


async def test_binary_request_and_binary_response(api: Any) -> None:
    values = [1.5, -2.0, 3.25, 4.0]
    head = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [2, 2],
                "parameters": {"binary_data_size": 16},
            }
        ],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }
    content, headers = _binary_request(head, [struct.pack("<4f", *values)])

    response = await api.client.post("/v2/models/doubler/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/octet-stream")
    body, blob = _split_binary_response(response)
    [output] = body["outputs"]
    assert output["shape"] == [2, 2]
    assert output["parameters"] == {"binary_data_size": 16}
    assert "data" not in output
    assert list(struct.unpack("<4f", blob)) == [2 * v for v in values]


async def test_binary_request_with_a_json_response(api: Any) -> None:
    head = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [1, 2],
                "parameters": {"binary_data_size": 8},
            }
        ]
    }
    content, headers = _binary_request(head, [struct.pack("<2f", 1.0, 2.0)])
    response = await api.client.post("/v2/models/doubler/infer", content=content, headers=headers)
    assert HEADER.lower() not in {k.lower() for k in response.headers}
    assert response.json()["outputs"][0]["data"] == [2.0, 4.0]


async def test_binary_output_for_all_outputs_and_bytes_elements(api: Any) -> None:
    texts = [b"hello", b"binary world"]
    blob = b"".join(struct.pack("<I", len(t)) + t for t in texts)
    head = {
        "inputs": [
            {
                "name": "text",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(blob)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    content, headers = _binary_request(head, [blob])
    response = await api.client.post("/v2/models/cls/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    body, tail = _split_binary_response(response)
    sizes = {o["name"]: o["parameters"]["binary_data_size"] for o in body["outputs"]}
    labels_blob, scores_blob = tail[: sizes["label"]], tail[sizes["label"] :]
    labels, offset = [], 0
    while offset < len(labels_blob):
        (n,) = struct.unpack_from("<I", labels_blob, offset)
        labels.append(labels_blob[offset + 4 : offset + 4 + n].decode())
        offset += 4 + n
    assert labels == ["positive", "negative"]
    assert list(struct.unpack("<2f", scores_blob)) == pytest.approx([0.9, 0.9])


@pytest.mark.parametrize(
    ("size", "blob", "header", "expected"),
    [
        (16, struct.pack("<3f", 1, 2, 3), None, "binary_data_size exceeds the body"),
        (
            12,
            struct.pack("<3f", 1, 2, 3),
            None,
            "tensor 'INPUT0': shape [2, 2] of FP32 needs 16 bytes, got 12",
        ),
        (16, struct.pack("<5f", 1, 2, 3, 4, 5), None, "binary data left over"),
        (16, struct.pack("<4f", 1, 2, 3, 4), "abc", "must be an integer"),
        (16, struct.pack("<4f", 1, 2, 3, 4), "999999", "exceeds the body"),
    ],
)
async def test_bad_binary_requests_are_400(
    api: Any, problem: Any, size: int, blob: bytes, header: str | None, expected: str
) -> None:
    head = {
        "inputs": [
            {
                "name": "INPUT0",
                "datatype": "FP32",
                "shape": [2, 2],
                "parameters": {"binary_data_size": size},
            }
        ]
    }
    content, headers = _binary_request(head, [blob])
    if header is not None:
        headers[HEADER] = header
    response = await api.client.post("/v2/models/doubler/infer", content=content, headers=headers)
    assert expected in problem(response, 400)["detail"]


# -- repository ----------------------------------------------------------------------------------


async def test_repository_index_unload_and_load(api: Any, problem: Any) -> None:
    index = (await api.client.post("/v2/repository/index")).json()
    rows = {(r["name"], r["version"]): r for r in index}
    assert rows[("doubler", "1")]["state"] == "READY"
    assert rows[("broken", "1")]["state"] == "UNAVAILABLE"
    assert rows[("broken", "1")]["reason"] == "failing backend refused to load"
    assert (await api.client.get("/v2/repository/index")).json() == index

    unloaded = await api.client.post("/v2/repository/models/doubler/unload")
    assert unloaded.status_code == 200
    rows = {r["name"]: r for r in (await api.client.post("/v2/repository/index")).json()}
    assert rows["doubler"]["state"] == "UNAVAILABLE"
    problem(await api.client.post("/v2/models/doubler/infer", json=_input0([1, 1], [1])), 503)
    problem(await api.client.get("/v2/health/ready"), 503)

    loaded = await api.client.post("/v2/repository/models/doubler/load")
    assert loaded.status_code == 200 and loaded.json() == {"name": "doubler", "loaded": True}
    again = await api.client.post("/v2/models/doubler/infer", json=_input0([1, 1], [4]))
    assert again.json()["outputs"][0]["data"] == [8.0]
    assert (await api.client.get("/v2/health/ready")).status_code == 200


async def test_loading_a_model_that_fails_again_is_503_with_the_reason(
    api: Any, problem: Any
) -> None:
    response = await api.client.post("/v2/repository/models/broken/load")
    assert "failing backend refused to load" in problem(response, 503)["detail"]
