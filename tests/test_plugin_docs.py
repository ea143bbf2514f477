"""docs/plugins.md stays true: every per-task example backend is served and answers its task.

Each task's section holds a ```` ```python ```` block starting ``# example: TASK`` (the backend
module), and a ```` ```json ```` block (the model file) right before a ```` ```toml ```` block
starting ``# config: TASK`` (a config that serves it). Each example is run exactly as written:
its module is executed, its ``register_backends`` hook registered in a ``PluginHost``, and the
config loaded from a file, with the model file at the config's relative ``source``. It must
then answer its own warm-up probe and a request of its task over ``/v1`` and ``/v2``, and keep
the backend contract (``modelyard.testing.BackendConformance``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import sys
import tomllib
import types
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from modelyard import (
    Backend,
    InferenceService,
    PluginHost,
    Task,
    Tensor,
    TensorRequest,
    create_app,
    load_settings,
)
from modelyard.testing import BackendConformance

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"

_EXAMPLE = re.compile(r"^```python\n# example: (\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
_MODEL_AND_CONFIG = re.compile(
    r"^```json\n(.*?)^```\n+```toml\n# config: (\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL
)


@dataclass(frozen=True)
class Example:
    """One task's example, as the docs show it."""

    task: Task
    code: str  # the backend module
    model: str  # the model file
    config: str  # a config file that serves it

    @property
    def entry(self) -> dict[str, Any]:
        (model,) = tomllib.loads(self.config)["models"]
        assert isinstance(model, dict)
        return model


def _read_examples() -> dict[Task, Example]:
    text = DOC.read_text()
    code = dict(_EXAMPLE.findall(text))
    return {
        Task(task): Example(Task(task), code.get(task, ""), model, config)
        for model, task, config in _MODEL_AND_CONFIG.findall(text)
    }


EXAMPLES = _read_examples()


@functools.cache
def _module(task: Task) -> types.ModuleType:
    """The example's backend module, executed once (msgspec resolves its annotations through
    ``sys.modules``, so it stays there for the session)."""
    name = f"_plugin_docs_{task.value}_example"
    module = types.ModuleType(name)
    sys.modules[name] = module
    source = compile(EXAMPLES[task].code, f"docs/plugins.md ({task.value} example)", "exec")
    exec(source, module.__dict__)  # noqa: S102 - the docs' own example, run as written
    return module


def _backend(task: Task) -> type[Backend]:
    """The one backend the example's ``register_backends`` hook registers."""
    registered: list[type[Backend]] = []
    _module(task).register_backends(registered.append)
    (cls,) = registered
    return cls


# -- served as the docs say ---------------------------------------------------------------------


@dataclass
class Served:
    client: httpx.AsyncClient
    model: str


Serve = Callable[[Task], AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    """``async with serve(task) as served``: the example loaded from its config, in process."""

    @asynccontextmanager
    async def start(task: Task) -> AsyncIterator[Served]:
        example = EXAMPLES[task]
        config = tmp_path / "deploy" / "modelyard.toml"
        config.parent.mkdir()
        config.write_text(example.config)
        model_file = config.parent / example.entry["source"]
        model_file.parent.mkdir(parents=True, exist_ok=True)
        model_file.write_text(example.model)
        # Warm-up on for every load: the example must answer the server's own probe too.
        settings = load_settings(config, env={"MODELYARD_SERVER__WARMUP": "all"})
        # A relative source resolves against the config file's directory, not the cwd.
        assert Path(settings.models[0].source) == model_file
        host = PluginHost(allow=())
        name = f"docs-{task.value}"
        assert host.register(_module(task), name=name), host.records
        try:
            service = InferenceService(settings, host)
            app = create_app(settings, plugins=host, service=service)
            await service.start()
            try:
                await service.wait_until_loaded()
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(
                    transport=transport, base_url="http://testserver"
                ) as client:
                    yield Served(client, example.entry["name"])
            finally:
                await service.stop()
        finally:
            host.unregister(name)

    return start


async def _ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, response.text
    return response.json()


def _events(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON events of an OpenAI event stream, which must end with ``[DONE]``."""
    assert response.status_code == 200, response.text
    data = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", response.text
    events = [json.loads(item) for item in data[:-1]]
    assert not [e for e in events if "error" in e], response.text
    return events


def _streamed(events: list[dict[str, Any]], read: Callable[[dict[str, Any]], str]) -> str:
    """The text of a stream whose last choice, and only that one, carries finish_reason."""
    choices = [e["choices"][0] for e in events if e["choices"]]
    reasons = [c["finish_reason"] for c in choices]
    assert reasons[-1] in ("stop", "length") and set(reasons[:-1]) <= {None}, reasons
    return "".join(read(c) for c in choices)


# -- the docs hold what the tests run ------------------------------------------------------------


def test_every_task_has_an_example_backend_a_model_file_and_a_config() -> None:
    assert set(EXAMPLES) == set(Task)
    for task, example in EXAMPLES.items():
        assert example.code, f"docs/plugins.md has no ```python block '# example: {task}'"
        json.loads(example.model)
        assert example.entry["task"] == task.value
        cls = _backend(task)
        assert example.entry["backend"] == cls.name and task in cls.tasks


# -- one request of each task over /v1 (tensor: /v2) ---------------------------------------------


async def test_the_chat_example_answers_chat_completions_and_streams(serve: Serve) -> None:
    async with serve(Task.CHAT) as served:
        body = {
            "model": served.model, "max_tokens": 16,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"},
            ],
        }
        answer = await _ok(await served.client.post("/v1/chat/completions", json=body))
        (choice,) = answer["choices"]
        reply = choice["message"]["content"]
        assert choice["message"]["role"] == "assistant" and reply.endswith("hello there")
        assert choice["finish_reason"] == "stop"
        assert answer["usage"]["prompt_tokens"] == 4
        assert answer["usage"]["completion_tokens"] == len(reply.split())

        streamed = _events(await served.client.post("/v1/chat/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True},
        }))
        assert _streamed(streamed, lambda c: c["delta"].get("content", "")) == reply
        assert streamed[-1]["usage"] == answer["usage"]


async def test_the_completion_example_answers_completions_stops_and_streams(
    serve: Serve,
) -> None:
    async with serve(Task.COMPLETION) as served:
        body = {"model": served.model, "prompt": "once upon a time", "max_tokens": 5}
        answer = await _ok(await served.client.post("/v1/completions", json=body))
        (choice,) = answer["choices"]
        assert len(choice["text"].split()) == 5 and choice["finish_reason"] == "length"
        assert answer["usage"]["prompt_tokens"] == 4
        assert answer["usage"]["completion_tokens"] == 5

        stopped = await _ok(await served.client.post(
            "/v1/completions", json={**body, "max_tokens": 20, "stop": ["cat"]}
        ))
        (choice,) = stopped["choices"]
        assert choice["finish_reason"] == "stop" and "cat" not in choice["text"]

        streamed = _events(await served.client.post(
            "/v1/completions", json={**body, "stream": True}
        ))
        assert _streamed(streamed, lambda c: c["text"]) == answer["choices"][0]["text"]


async def test_the_embeddings_example_answers_one_vector_per_input(serve: Serve) -> None:
    async with serve(Task.EMBEDDINGS) as served:
        texts = ["good morning to you", "hi"]
        answer = await _ok(await served.client.post(
            "/v1/embeddings", json={"model": served.model, "input": texts}
        ))
        rows = [item["embedding"] for item in answer["data"]]
        assert [item["index"] for item in answer["data"]] == [0, 1]
        assert [len(row) for row in rows] == [8, 8] and rows[0] != rows[1]
        for row in rows:  # normalize = true in the config
            assert math.isclose(math.sqrt(sum(x * x for x in row)), 1.0, rel_tol=1e-6)
        assert answer["usage"]["prompt_tokens"] == 5
        assert answer["usage"]["truncated_inputs"] == 0


async def test_the_classification_example_answers_labels_best_first(serve: Serve) -> None:
    async with serve(Task.CLASSIFICATION) as served:
        texts = ["a good and great day", "awful weather"]
        best = await _ok(await served.client.post(
            "/v1/classify", json={"model": served.model, "input": texts, "top_k": 1}
        ))
        assert [[x["label"] for x in item["labels"]] for item in best["data"]] == [
            ["positive"], ["negative"],
        ]
        every = await _ok(await served.client.post(
            "/v1/classify", json={"model": served.model, "input": texts}
        ))
        for item in every["data"]:
            scores = [x["score"] for x in item["labels"]]
            assert len(scores) == 2 and scores == sorted(scores, reverse=True)
            assert math.isclose(sum(scores), 1.0, rel_tol=1e-6)
        assert every["usage"]["prompt_tokens"] == 7


async def test_the_tensor_example_answers_v2_infer_and_refuses_a_wrong_shape(
    serve: Serve,
) -> None:
    async with serve(Task.TENSOR) as served:
        path = f"/v2/models/{served.model}/infer"
        x = {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": [1, 2, 3, 0, 0, 0]}
        answer = await _ok(await served.client.post(path, json={"inputs": [x]}))
        (y,) = answer["outputs"]
        assert (y["name"], y["datatype"], y["shape"]) == ("y", "FP32", [2, 1])
        assert y["data"] == pytest.approx([5.5, 1.0])  # x · [0.5, -1, 2] + 1

        wrong = await served.client.post(
            path, json={"inputs": [{**x, "shape": [1, 2], "data": [1, 2]}]}
        )
        assert wrong.status_code == 400, wrong.text
        assert wrong.headers["content-type"].startswith("application/problem+json")
        assert "'x'" in wrong.json()["detail"]


# -- the v2 mapping of the text tasks, as the docs' table says ----------------------------------

_TEXT = {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["good day", "awful"]}
_PROMPT = {"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hello there"]}
#: task -> (the input tensor, {output name: (datatype, shape)})
_V2: Mapping[Task, tuple[dict[str, Any], dict[str, tuple[str, list[int]]]]] = {
    Task.EMBEDDINGS: (_TEXT, {"embedding": ("FP32", [2, 8])}),
    Task.CLASSIFICATION: (_TEXT, {"label": ("BYTES", [2]), "score": ("FP32", [2])}),
    Task.CHAT: (_PROMPT, {"text_output": ("BYTES", [1])}),
    Task.COMPLETION: (_PROMPT, {"text_output": ("BYTES", [1])}),
}


@pytest.mark.parametrize("task", list(_V2), ids=lambda t: t.value)
async def test_v2_serves_the_example_with_the_documented_tensors(
    serve: Serve, task: Task
) -> None:
    tensor, outputs = _V2[task]
    async with serve(task) as served:
        meta = await _ok(await served.client.get(f"/v2/models/{served.model}"))
        assert [t["name"] for t in meta["inputs"]] == [tensor["name"]]
        assert [t["name"] for t in meta["outputs"]] == list(outputs)
        answer = await _ok(await served.client.post(
            f"/v2/models/{served.model}/infer", json={"inputs": [tensor]}
        ))
        got = {t["name"]: (t["datatype"], t["shape"]) for t in answer["outputs"]}
        assert got == outputs
        if task == Task.CLASSIFICATION:
            labels = next(t["data"] for t in answer["outputs"] if t["name"] == "label")
            assert labels == ["positive", "negative"]


async def test_v2_shows_the_tensor_examples_declared_signature(serve: Serve) -> None:
    async with serve(Task.TENSOR) as served:
        meta = await _ok(await served.client.get(f"/v2/models/{served.model}"))
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 3]}]
        assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 1]}]


# -- the examples keep the backend contract -------------------------------------------------------


class _ExampleConformance(BackendConformance):
    """The conformance kit, run on one example straight from the docs (no entry point)."""

    example: ClassVar[Task]

    def backend_class(self) -> type[Backend]:
        return _backend(self.example)

    def options_for(self, task: Task) -> Mapping[str, Any]:
        options: Mapping[str, Any] = EXAMPLES[task].entry.get("options", {})
        return options

    @pytest.fixture
    def model_source(self, task: Task, tmp_path: Path) -> Path:
        path = tmp_path / "model" / Path(EXAMPLES[task].entry["source"]).name
        path.parent.mkdir()
        path.write_text(EXAMPLES[task].model)
        return path


class TestChatExampleConformance(_ExampleConformance):
    example = Task.CHAT
    tasks = (Task.CHAT,)


class TestCompletionExampleConformance(_ExampleConformance):
    example = Task.COMPLETION
    tasks = (Task.COMPLETION,)


class TestEmbeddingsExampleConformance(_ExampleConformance):
    example = Task.EMBEDDINGS
    tasks = (Task.EMBEDDINGS,)
    embedding_dim = 8


class TestClassificationExampleConformance(_ExampleConformance):
    example = Task.CLASSIFICATION
    tasks = (Task.CLASSIFICATION,)


class TestTensorExampleConformance(_ExampleConformance):
    example = Task.TENSOR
    tasks = (Task.TENSOR,)

    def tensor_request(self, index: int) -> TensorRequest:
        rows = index % 3 + 1
        data = [float(index + k) for k in range(rows * 3)]
        return TensorRequest((Tensor("x", "FP32", (rows, 3), data),))
