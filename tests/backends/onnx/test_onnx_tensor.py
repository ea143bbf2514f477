"""The tensor task: any ONNX graph over v2 /infer, shapes and datatypes from the graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from modelyard.backends.onnx.tensor import TensorTask
from modelyard.core.errors import BadRequestError
from modelyard.core.types import Tensor, TensorRequest


def _model(path: Path, **extra: Any) -> dict[str, Any]:
    return {"name": "t", "backend": "onnx", "source": str(path), **extra}


def _body(x: list[list[float]], ids: list[int], **over: Any) -> dict[str, Any]:
    inputs = [
        {"name": "X", "datatype": "FP32", "shape": [len(x), 3], "data": x},
        {"name": "IDS", "datatype": "INT64", "shape": [len(ids)], "data": ids},
    ]
    for item in inputs:
        item.update(over.get(item["name"], {}))
    return {"inputs": inputs}


async def test_metadata_comes_from_the_graph(start_onnx_api: Any, tensor_model: Path) -> None:
    api = await start_onnx_api(_model(tensor_model))
    meta = (await api.client.get("/v2/models/t")).json()
    assert meta["platform"] == "onnxruntime"
    assert meta["inputs"] == [
        {"name": "X", "datatype": "FP32", "shape": [-1, 3]},
        {"name": "IDS", "datatype": "INT64", "shape": [-1]},
    ]
    assert meta["outputs"][1] == {"name": "COUNT", "datatype": "INT64", "shape": [-1]}
    assert meta["parameters"]["task"] == "tensor"  # detected: no tokenizer beside the graph
    assert meta["parameters"]["providers"] == ["CPUExecutionProvider"]


async def test_infer_over_http_respects_dynamic_axes(
    start_onnx_api: Any, tensor_model: Path
) -> None:
    api = await start_onnx_api(_model(tensor_model))
    r = await api.client.post("/v2/models/t/infer", json=_body([[1, 2, 3], [4, 5, 6]], [7, 8]))
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["Y"]["shape"] == [2, 3] and out["Y"]["data"] == [2, 4, 6, 8, 10, 12]
    assert out["COUNT"] == {"name": "COUNT", "datatype": "INT64", "shape": [2], "data": [8, 9]}
    one = await api.client.post(
        "/v2/models/t/infer", json={**_body([[1, 1, 1]], [0]), "outputs": [{"name": "COUNT"}]}
    )
    assert [o["name"] for o in one.json()["outputs"]] == ["COUNT"]


async def test_wrong_shape_or_datatype_is_a_400_naming_the_tensor(
    start_onnx_api: Any, tensor_model: Path
) -> None:
    api = await start_onnx_api(_model(tensor_model))
    wrong_shape = _body([[1, 2], [3, 4]], [1, 2], X={"shape": [2, 2]})
    r = await api.client.post("/v2/models/t/infer", json=wrong_shape)
    assert r.status_code == 400
    assert "'X'" in r.json()["detail"] and "[-1, 3]" in r.json()["detail"]
    wrong_type = _body([[1, 2, 3]], [1], IDS={"datatype": "FP32", "data": [1.0]})
    r = await api.client.post("/v2/models/t/infer", json=wrong_type)
    assert r.status_code == 400
    assert "'IDS'" in r.json()["detail"] and "INT64" in r.json()["detail"]
    missing = {"inputs": _body([[1, 2, 3]], [1])["inputs"][:1]}
    r = await api.client.post("/v2/models/t/infer", json=missing)
    assert r.status_code == 400 and "'IDS' is missing" in r.json()["detail"]


async def test_binary_output_is_packed_from_the_array(
    start_onnx_api: Any, tensor_model: Path
) -> None:
    api = await start_onnx_api(_model(tensor_model))
    body = {**_body([[1, 2, 3]], [5]), "parameters": {"binary_data_output": True}}
    r = await api.client.post("/v2/models/t/infer", json=body)
    head = int(r.headers["inference-header-content-length"])
    meta = json.loads(r.content[:head])
    assert [o["parameters"]["binary_data_size"] for o in meta["outputs"]] == [12, 8]
    assert np.frombuffer(r.content[head : head + 12], "<f4").tolist() == [2, 4, 6]


def _request(rows: int, start: float = 0.0) -> TensorRequest:
    x = [start + i for i in range(rows * 3)]
    return TensorRequest(
        (Tensor("X", "FP32", (rows, 3), x), Tensor("IDS", "INT64", (rows,), list(range(rows))))
    )


class _CountingSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.batches: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        self.batches.append(len(feeds["X"]))
        return self._session.run(names, feeds)


def test_same_shaped_requests_share_one_run_and_split_back(tensor_model: Path) -> None:
    import onnxruntime as ort

    session = _CountingSession(ort.InferenceSession(str(tensor_model)))
    task = TensorTask(session)
    bad = TensorRequest((Tensor("X", "FP32", (1, 2), [1.0, 2.0]),))
    results = task.run([_request(1), _request(2, 10.0), bad, _request(3, 100.0)])
    assert session.batches == [6]  # 1 + 2 + 3 rows, one session.run; the bad one never ran
    assert isinstance(results[2], BadRequestError) and "'X'" in str(results[2])
    second = results[1]
    assert not isinstance(second, Exception)
    assert second.outputs[0].shape == (2, 3)
    assert second.outputs[0].data.tolist() == [2 * (10.0 + i) for i in range(6)]
    assert results[3].outputs[1].data.tolist() == [1, 2, 3]  # type: ignore[union-attr]


async def test_bytes_tensors_round_trip(start_onnx_api: Any, tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save_model

    graph = helper.make_graph(
        [helper.make_node("Identity", ["S"], ["O"])],
        "strings",
        [helper.make_tensor_value_info("S", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("O", TensorProto.STRING, ["N"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, str(tmp_path / "model.onnx"))
    api = await start_onnx_api(_model(tmp_path, task="tensor"))
    body = {"inputs": [{"name": "S", "datatype": "BYTES", "shape": [2], "data": ["héllo", "b"]}]}
    r = await api.client.post("/v2/models/t/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0] == {
        "name": "O",
        "datatype": "BYTES",
        "shape": [2],
        "data": ["héllo", "b"],
    }
