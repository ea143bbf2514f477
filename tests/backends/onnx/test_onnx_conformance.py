"""The onnx backend passes the conformance kit plugin authors run, for every task it serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelyard import Task, Tensor, TensorRequest
from modelyard.testing import BackendConformance


class TestOnnxConformance(BackendConformance):
    entry_point = "onnx"
    tasks = (Task.EMBEDDINGS, Task.CLASSIFICATION, Task.TENSOR, Task.COMPLETION, Task.CHAT)
    # One run on one thread: the suite shares two cores with the rest of the tests.
    options = {"intra_op_threads": 1, "concurrent_runs": 1, "max_batch_size": 8}
    embedding_dim = 32  # the tiny BERT's hidden size

    @pytest.fixture
    def model_source(self, task: Task, request: pytest.FixtureRequest) -> Path:
        fixture = {
            Task.TENSOR: "tensor_model",
            Task.EMBEDDINGS: "tiny_encoder",
            Task.CLASSIFICATION: "tiny_classifier",
            Task.COMPLETION: "tiny_gpt2",
            Task.CHAT: "tiny_gpt2",
        }[task]
        path: Path = request.getfixturevalue(fixture)
        return path

    def tensor_request(self, index: int) -> TensorRequest:
        """The hand-built graph: Y = X * 2 (FP32 [N, 3]), COUNT = IDS + 1 (INT64 [N])."""
        x = [float(index + k) / 4 for k in range(6)]
        return TensorRequest(
            (Tensor("X", "FP32", (2, 3), x), Tensor("IDS", "INT64", (2,), [index, index + 1]))
        )
