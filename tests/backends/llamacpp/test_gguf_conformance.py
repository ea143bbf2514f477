"""The gguf backend passes the conformance kit plugin authors run (chat, completion, embeddings)."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_testing import MakeGGUF

from modelyard import Task
from modelyard.testing import BackendConformance


class TestGGUFConformance(BackendConformance):
    entry_point = "gguf"
    tasks = (Task.CHAT, Task.COMPLETION, Task.EMBEDDINGS)
    # One thread and two slots: the suite shares two cores; two slots still make a batch.
    options = {"n_threads": 1, "n_ctx": 256, "parallel": 2}
    embedding_dim = 64

    @pytest.fixture
    def model_source(self, task: Task, make_gguf: MakeGGUF) -> Path:
        if task == Task.EMBEDDINGS:
            return make_gguf("tiny-embed", chat_template=None, pooling_type=1)
        return make_gguf("tiny-chatml")
