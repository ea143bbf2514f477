"""What an ONNX version reports holding: its graph file and that graph's external data only."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard.backends.onnx.backend import OnnxBackend
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.backend import LoadContext
from modelyard.core.types import Task

onnx = pytest.importorskip("onnx")


def _backend(path: Path) -> OnnxBackend:
    return OnnxBackend(
        LoadContext(model="m", version="1", task=Task.TENSOR, source=str(path), path=path,
                    options=OnnxOptions())
    )


def _split_model(folder: Path) -> Path:
    """A graph whose weight lives in ``weights/w.bin`` (12 bytes used, 4096 on disk)."""
    from onnx import TensorProto, helper

    weight = helper.make_tensor("W", TensorProto.FLOAT, [3], [0.0, 0.0, 0.0])
    weight.data_location = TensorProto.EXTERNAL
    del weight.float_data[:]
    for key, value in (("location", "weights/w.bin"), ("offset", "0"), ("length", "12")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "W"], ["Y"])], "split",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [3])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "weights").mkdir(parents=True)
    (folder / "weights" / "w.bin").write_bytes(bytes(4096))
    onnx.save_model(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_a_split_model_counts_its_graph_and_its_external_data(tmp_path: Path) -> None:
    graph = _split_model(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_bytes(bytes(100_000))  # not the model's: not counted
    assert _backend(tmp_path / "m").memory_bytes() == graph.stat().st_size + 4096


def test_a_single_file_model_counts_that_file(tensor_model: Path) -> None:
    assert _backend(tensor_model).memory_bytes() == tensor_model.stat().st_size
