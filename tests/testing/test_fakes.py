"""modelyard.testing: the fakes, the clock, the live server and the pytest fixtures."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from litestar import Litestar, get

from modelyard.core.backend import LoadContext
from modelyard.core.errors import BackendError, BadRequestError
from modelyard.core.plugins import PluginHost
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationParams,
    Task,
    Tensor,
    TensorRequest,
)
from modelyard.testing import (
    CountingBackend,
    EchoBackend,
    EchoOptions,
    FailingBackend,
    FakeClock,
    HangingBackend,
    run_live_server,
)
from modelyard.testing.backends import fake_embedding


def _backend(cls: type[EchoBackend] = EchoBackend, **options: Any) -> EchoBackend:
    context = LoadContext(model="m", version="1", task=Task.CHAT, source=".", path=None,
                          options=EchoOptions(**options))
    return cls(context)


def test_fake_clock_moves_only_when_told(fake_clock: FakeClock) -> None:
    start = fake_clock()
    assert fake_clock() == start
    fake_clock.advance(2.5)
    assert fake_clock() == start + 2.5


def test_plugin_host_fixture_holds_exactly_the_fakes(plugin_host: PluginHost) -> None:
    assert set(plugin_host.backends) == {"echo", "slow", "failing", "hanging", "stuck", "counting"}
    assert [r.name for r in plugin_host.records] == ["testing"]


def test_make_settings_ignores_the_process_environment(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELYARD_SERVER__PORT", "1234")
    assert make_settings(server={"port": 9}).server.port == 9


async def test_echo_answers_every_task() -> None:
    echo = _backend(dim=3)
    chat, completion, embedding, labels = await echo.infer([
        ChatRequest((ChatMessage("user", "hi there"),), GenerationParams(max_tokens=1)),
        CompletionRequest("a b c", GenerationParams(stop=("b",))),
        EmbeddingRequest(("x", "y")),
        ClassificationRequest(("ab",), top_k=1),
    ])
    assert (chat.text, chat.finish_reason) == ("hi", "length")  # type: ignore[union-attr]
    assert (completion.text, completion.finish_reason) == ("a ", "stop")  # type: ignore[union-attr]
    assert embedding.embeddings == [fake_embedding("x", 3), fake_embedding("y", 3)]  # type: ignore[union-attr]
    assert [[lb.label for lb in row] for row in labels.labels] == [["negative"]]  # type: ignore[union-attr]
    assert echo.calls == [4]


def test_fake_embeddings_are_deterministic_unit_vectors() -> None:
    vector = fake_embedding("text", 32)
    assert vector == fake_embedding("text", 32)
    assert vector != fake_embedding("other", 32)
    assert sum(x * x for x in vector) == pytest.approx(1.0)


async def test_echo_doubles_input0_and_checks_it() -> None:
    echo = _backend()
    [result] = await echo.infer([TensorRequest((Tensor("INPUT0", "FP32", (1, 2), [1, 2]),))])
    assert result.outputs[0].data == [2.0, 4.0]  # type: ignore[union-attr]
    with pytest.raises(BadRequestError, match="'INPUT0' is missing"):
        await echo.infer([TensorRequest((Tensor("X", "FP32", (1,), [1]),))])


async def test_echo_streams_word_by_word() -> None:
    chunks = [c async for c in _backend().stream(CompletionRequest("one two"))]
    assert [c.text for c in chunks] == ["one", " two", ""]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].completion_tokens == 2


async def test_failing_backend_fails_on_infer_or_on_load() -> None:
    with pytest.raises(RuntimeError):
        await _backend(FailingBackend).infer([CompletionRequest("x")])
    with pytest.raises(BackendError):
        await _backend(FailingBackend, fail_on_load=True).load()


async def test_hanging_backend_answers_once_released() -> None:
    hanging = _backend(HangingBackend)
    assert isinstance(hanging, HangingBackend)
    pending = asyncio.create_task(hanging.infer([CompletionRequest("x")]))
    await asyncio.sleep(0)
    assert not pending.done()
    hanging.release.set()
    assert (await pending)[0].text == "x"  # type: ignore[union-attr]


async def test_counting_backend_records_each_batch_size() -> None:
    counting = _backend(CountingBackend)
    await counting.infer([CompletionRequest("a")] * 3)
    await counting.infer([CompletionRequest("a")])
    assert counting.calls == [3, 1]


def test_run_live_server_serves_until_the_block_ends() -> None:
    @get("/ping", sync_to_thread=False)
    def ping() -> dict[str, str]:
        return {"pong": "yes"}

    with run_live_server(Litestar([ping])) as server:
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{server.url}/ping").json() == {"pong": "yes"}
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/ping", timeout=2)


def test_run_live_server_reports_a_failed_startup() -> None:
    def explode() -> None:
        raise RuntimeError("startup failed")

    with (
        pytest.raises(RuntimeError, match="live server exited during startup"),
        run_live_server(Litestar([], on_startup=[explode])),
    ):
        pass  # pragma: no cover
