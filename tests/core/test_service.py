"""InferenceService in-process: loading, versions, errors, batching through the service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from modelyard import ServerContext, hookimpl
from modelyard.core.auth import Principal
from modelyard.core.errors import (
    BackendError,
    ModelNotFoundError,
    ModelNotReadyError,
    TimeoutError_,
    UnsupportedTaskError,
)
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import VersionState
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationResult,
)
from modelyard.testing import HangingBackend

Start = Callable[..., Any]


def _model(
    name: str, backend: str = "echo", task: str | None = "chat", **extra: Any
) -> dict[str, Any]:
    table = {"name": name, "backend": backend, "source": ".", **extra}
    if task is not None:
        table["task"] = task
    return table


@pytest.fixture
async def start_service(
    plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> AsyncIterator[Start]:
    started: list[InferenceService] = []

    async def start(*models: dict[str, Any], wait: bool = True, **tables: Any) -> InferenceService:
        service = InferenceService(make_settings(models=list(models), **tables), plugin_host)
        await service.start()
        started.append(service)
        if wait:
            await service.wait_until_loaded()
        return service

    yield start
    for service in started:
        await service.stop()


def _chat(text: str, **params: Any) -> ChatRequest:
    return ChatRequest((ChatMessage("user", text),))


async def test_configured_models_load_and_serve(start_service: Start) -> None:
    service = await start_service(_model("chat"), _model("emb", task="embeddings"))

    assert service.ready()
    answer = (await service.infer("chat", _chat("hello world"))).result
    assert isinstance(answer, GenerationResult) and answer.text == "hello world"
    vectors = (await service.infer("emb", EmbeddingRequest(("a", "b")))).result
    assert isinstance(vectors, EmbeddingResult) and len(vectors.embeddings) == 2
    states = {m.name: m.versions[0].state for m in service.model_views()}
    assert states == {"chat": "active", "emb": "active"}


async def test_a_chat_model_also_answers_raw_completions(start_service: Start) -> None:
    service = await start_service(_model("chat"))
    answer = (await service.infer("chat", CompletionRequest("go on"))).result
    assert answer.text == "go on"  # type: ignore[union-attr]


async def test_a_task_the_model_does_not_serve_is_a_400(start_service: Start) -> None:
    service = await start_service(_model("chat"))
    with pytest.raises(UnsupportedTaskError) as caught:
        await service.infer("chat", EmbeddingRequest(("x",)))
    assert caught.value.status_code == 400
    assert caught.value.detail == "model 'chat' serves chat, not embeddings"


async def test_unknown_models_and_versions_are_404(start_service: Start) -> None:
    service = await start_service(_model("chat"))
    with pytest.raises(ModelNotFoundError, match="model 'nope' does not exist"):
        await service.infer("nope", _chat("x"))
    with pytest.raises(ModelNotFoundError, match="model 'chat' has no version '7'"):
        await service.infer("chat", _chat("x"), version="7")


async def test_the_active_version_serves_and_others_are_reachable_by_label(
    start_service: Start,
) -> None:
    service = await start_service(_model("m", version="1"), _model("m", version="2", active=True))
    found = (await service.infer("m", _chat("x"))).version
    assert found.version == "2"
    found = (await service.infer("m", _chat("x"), version="1")).version
    assert found.version == "1"
    versions = {v.version: v.state for v in service.model_views()[0].versions}
    assert versions == {"1": "ready", "2": "active"}


async def test_a_model_that_fails_to_load_is_503_with_the_reason(start_service: Start) -> None:
    service = await start_service(
        _model("ok"), _model("broken", backend="failing", options={"fail_on_load": True})
    )
    version = service.registry.entry("broken").versions["1"]
    assert version.state == VersionState.FAILED
    assert version.error == "failing backend refused to load"
    assert not service.ready()  # a required model is missing

    with pytest.raises(ModelNotReadyError) as caught:
        await service.infer("broken", _chat("x"))
    assert caught.value.status_code == 503
    assert caught.value.headers["Retry-After"] == "5"
    assert "failed" in caught.value.detail
    assert "failing backend refused to load" in caught.value.detail
    # The other model keeps serving.
    answer = (await service.infer("ok", _chat("still here"))).result
    assert answer.text == "still here"  # type: ignore[union-attr]


async def test_an_optional_model_that_fails_does_not_block_readiness(start_service: Start) -> None:
    service = await start_service(
        _model("ok"),
        _model("extra", backend="failing", required=False, options={"fail_on_load": True}),
    )
    assert service.ready()


async def test_a_missing_source_fails_the_version_not_the_server(start_service: Start) -> None:
    service = await start_service(_model("gone", source="/no/such/model.onnx"), _model("ok"))
    version = service.registry.entry("gone").versions["1"]
    assert version.state == VersionState.FAILED
    assert "does not exist" in version.error
    assert (await service.infer("ok", _chat("x"))).result.text == "x"  # type: ignore[union-attr]


async def test_a_backend_failure_is_a_500_and_the_model_keeps_serving(start_service: Start) -> None:
    service = await start_service(_model("flaky", backend="failing"))
    for _ in range(2):
        with pytest.raises(BackendError, match="model 'flaky' failed to answer"):
            await service.infer("flaky", _chat("x"))
    assert service.registry.get("flaky").serving


async def test_a_request_past_the_timeout_is_a_504(start_service: Start) -> None:
    service = await start_service(
        _model("stuck", backend="hanging"), server={"request_timeout_s": 0.05}
    )
    with pytest.raises(TimeoutError_) as caught:
        await service.infer("stuck", _chat("x"))
    assert caught.value.status_code == 504
    assert "did not answer within 0.05s" in caught.value.detail


async def test_eight_simultaneous_requests_form_one_batch(start_service: Start) -> None:
    service = await start_service(_model("m", backend="hanging", batching={"max_batch_size": 8}))
    backend = service.registry.get("m").backend
    assert isinstance(backend, HangingBackend)
    batcher = service.registry.get("m").batcher
    assert batcher is not None

    first = asyncio.create_task(service.infer("m", _chat("warm up")))
    while backend.calls != [1]:
        await asyncio.sleep(0)
    eight = [asyncio.create_task(service.infer("m", _chat(f"n{i}"))) for i in range(8)]
    while batcher.depth < 8:
        await asyncio.sleep(0)
    backend.release.set()
    answers = await asyncio.gather(first, *eight)

    assert backend.calls == [1, 8]
    assert [a.result.text for a in answers[1:]] == [f"n{i}" for i in range(8)]  # type: ignore[union-attr]


async def test_stream_yields_pieces_then_the_finish(start_service: Start) -> None:
    service = await start_service(_model("chat"))
    chunks = (await service.stream("chat", _chat("one two three"))).chunks
    received = [c async for c in chunks]
    assert "".join(c.text for c in received) == "one two three"
    assert received[-1].finish_reason == "stop"
    assert received[-1].completion_tokens == 3


async def test_a_stream_that_fails_to_start_raises_before_any_chunk(start_service: Start) -> None:
    service = await start_service(_model("flaky", backend="failing"))
    with pytest.raises(BackendError, match="model 'flaky' failed to answer"):
        await service.stream("flaky", _chat("x"))


async def test_readiness_waits_for_loading(start_service: Start, plugin_host: PluginHost) -> None:
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
        service = await start_service(_model("m", backend="slow-load"), wait=False)
        for _ in range(20):
            await asyncio.sleep(0)
        assert not service.ready()
        with pytest.raises(ModelNotReadyError, match="is loading"):
            await service.infer("m", _chat("x"))
        gate.set()
        await service.wait_until_loaded()
        assert service.ready()
    finally:
        plugin_host.unregister("slow-load")


async def test_unload_and_load_round_trip(start_service: Start) -> None:
    service = await start_service(_model("m"))
    await service.unload_model("m")
    assert service.registry.entry("m").versions["1"].state == VersionState.UNLOADED
    assert not service.ready()
    with pytest.raises(ModelNotReadyError, match="is unloaded"):
        await service.infer("m", _chat("x"))

    await service.load_model("m")
    assert service.ready()
    assert (await service.infer("m", _chat("back"))).result.text == "back"  # type: ignore[union-attr]


async def test_lifecycle_hooks_see_startup_states_and_shutdown(
    plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> None:
    events: list[str] = []

    class Observer:
        @staticmethod
        @hookimpl
        def server_startup(server: ServerContext) -> None:
            events.append("startup")

        @staticmethod
        @hookimpl
        def server_shutdown(server: ServerContext) -> None:
            events.append("shutdown")

        @staticmethod
        @hookimpl
        def model_version_state_changed(version: Any, old: Any, new: Any) -> None:
            events.append(f"{version.name}:{old.value if old else '-'}>{new.value}")

    plugin_host.register(Observer(), name="observer")
    try:
        service = InferenceService(make_settings(models=[_model("m")]), plugin_host)
        await service.start()
        await service.wait_until_loaded()
        await service.stop()
    finally:
        plugin_host.unregister("observer")
    assert events == [
        "startup",
        "m:->loading",
        "m:loading>ready",
        "m:ready>active",
        "shutdown",
        "m:active>unloaded",
    ]


RUNTIME_TEXT = (
    "[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from /models/m.onnx failed: "
    "/onnxruntime_src/onnxruntime/core/graph/model.cc:180 Protobuf parsing failed"
)


class _RuntimeFailsToLoad(HangingBackend):
    """A runtime that raises its own exception type, message full of its source paths."""

    name = "runtime-fails"

    async def load(self) -> None:
        raise RuntimeError(RUNTIME_TEXT)


async def test_a_runtime_load_error_goes_to_the_log_and_clients_get_a_stable_message(
    start_service: Start, plugin_host: PluginHost, caplog: pytest.LogCaptureFixture
) -> None:
    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register: Any) -> None:
            register(_RuntimeFailsToLoad)

    plugin_host.register(Plugin(), name="runtime-fails")
    try:
        service = await start_service(_model("m", backend="runtime-fails"), _model("ok"))
    finally:
        plugin_host.unregister("runtime-fails")
    version = service.registry.entry("m").versions["1"]
    assert version.state == VersionState.FAILED
    assert version.error == (
        "failed to load: backend 'runtime-fails' raised an unexpected error; "
        "the server log has the details"
    )
    with pytest.raises(ModelNotReadyError) as caught:
        await service.infer("m", _chat("x"))
    shown = [
        caught.value.detail,
        *(v.error or "" for m in service.model_views() for v in m.versions),
        *(row.reason for row in service.repository_index(Principal("test"))),
    ]
    for text in shown:
        assert "onnxruntime_src" not in text and "RuntimeError" not in text, text
    assert RUNTIME_TEXT in caplog.text  # the operator still gets the runtime's own words


async def test_configured_versions_do_not_warm_up_by_default(start_service: Start) -> None:
    service = await start_service(_model("m", backend="counting"))
    version = service.registry.entry("m").versions["1"]
    assert version.backend.calls == []  # type: ignore[union-attr]
    assert version.health is None


async def test_warm_up_sends_the_probe_before_the_version_is_ready(start_service: Start) -> None:
    service = await start_service(
        _model("m", backend="counting", probe={"warmup": True}),
        _model("e", backend="counting", task="embeddings", probe={"warmup": True}),
    )
    for name in ("m", "e"):
        version = service.registry.entry(name).versions["1"]
        assert version.state == VersionState.ACTIVE
        assert version.backend.calls == [1]  # type: ignore[union-attr]
        assert version.health is not None and version.health.ok


async def test_a_version_that_fails_warm_up_is_failed_and_unloaded(start_service: Start) -> None:
    service = await start_service(
        _model("bad", backend="failing", probe={"warmup": True}), _model("ok")
    )
    version = service.registry.entry("bad").versions["1"]
    assert version.state == VersionState.FAILED
    assert version.error.startswith("warm-up probe failed: ")
    assert version.backend is None and version.batcher is None
    assert not service.ready()
    with pytest.raises(ModelNotReadyError, match="warm-up probe failed"):
        await service.infer("bad", _chat("x"))


async def test_an_expectation_the_answer_misses_fails_warm_up(start_service: Start) -> None:
    service = await start_service(
        _model("m", probe={"warmup": True, "prompt": "ping", "expect": {"text_contains": "pong"}})
    )
    version = service.registry.entry("m").versions["1"]
    assert version.error == "warm-up probe failed: the answer 'ping' lacks 'pong'"
