"""Model files that must not load: external data leaving the directory, corrupt or non-ONNX
files; the server keeps serving everything else."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from modelyard.backends.onnx.safety import check_model_file, summarize
from modelyard.core.errors import ModelLoadError

onnx = pytest.importorskip("onnx")


def _external_model(path: Path, location: str) -> Path:
    """A graph whose only weight lives in external data at ``location``."""
    from onnx import TensorProto, helper

    weight = helper.make_tensor("W", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    for key, value in (("location", location), ("offset", "0"), ("length", "12")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])],
        "ext",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


@pytest.mark.parametrize(
    "location",
    ["../secret.bin", "/etc/passwd", "sub/../../secret.bin", "..\\secret.bin", "C:\\secret.bin"],
)
def test_external_data_outside_the_directory_is_refused(tmp_path: Path, location: str) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 12)
    model = _external_model(tmp_path / "m" / "model.onnx", location)
    with pytest.raises(ModelLoadError, match="outside the model directory"):
        check_model_file(model)


def test_a_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.bin").write_bytes(b"\0" * 12)
    model = _external_model(tmp_path / "m" / "model.onnx", "weights.bin")
    os.symlink(tmp_path / "secret.bin", tmp_path / "m" / "weights.bin")
    with pytest.raises(ModelLoadError, match="outside the model directory"):
        check_model_file(model)


def test_external_data_inside_the_directory_loads(tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    model = _external_model(tmp_path / "model.onnx", "weights/w.bin")
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.bin").write_bytes(np.array([1, 2, 3], "<f4").tobytes())
    summary = check_model_file(model)
    assert summary.external_locations == {"weights/w.bin"}
    assert summary.inputs == ["X"] and summary.outputs == ["Y"]
    (y,) = ort.InferenceSession(str(model)).run(None, {"X": np.zeros(3, np.float32)})
    assert y.tolist() == [1, 2, 3]


@pytest.mark.parametrize("content", [b"", b"this is not an onnx model\n", b"\x08\x07\x3a\xff\xff"])
def test_non_onnx_bytes_are_a_load_error_with_a_reason(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model"):
        summarize(path)


async def test_corrupt_model_fails_its_version_while_another_keeps_serving(
    start_onnx_api: Any, tensor_model: Path, tmp_path: Path
) -> None:
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.onnx").write_bytes(tensor_model.read_bytes()[:-40])  # truncated
    escaping = _external_model(tmp_path / "escaping" / "model.onnx", "../../etc/passwd")
    api = await start_onnx_api(
        {
            "name": "broken",
            "backend": "onnx",
            "source": str(corrupt),
            "task": "tensor",
            "required": False,
        },
        {"name": "sneaky", "backend": "onnx", "source": str(escaping.parent), "required": False},
        {"name": "good", "backend": "onnx", "source": str(tensor_model)},
    )
    index = {row["name"]: row for row in (await api.client.get("/v2/repository/index")).json()}
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "not a valid ONNX model" in index["broken"]["reason"]
    assert "outside the model directory" in index["sneaky"]["reason"]
    assert index["good"]["state"] == "READY"
    assert (await api.client.get("/v2/health/ready")).status_code == 200
    body = {
        "inputs": [
            {"name": "X", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]},
            {"name": "IDS", "datatype": "INT64", "shape": [1], "data": [1]},
        ]
    }
    r = await api.client.post("/v2/models/good/infer", json=body)
    assert r.status_code == 200


def test_no_custom_op_library_is_ever_registered() -> None:
    """Model metadata cannot make the backend load a shared library."""
    root = Path(__file__).parents[3] / "src" / "modelyard" / "backends" / "onnx"
    for source in root.glob("*.py"):
        code = source.read_text()
        assert "register_custom_ops_library(" not in code.replace(
            '"register_custom_ops_library"', ""
        )
