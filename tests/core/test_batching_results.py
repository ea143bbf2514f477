"""What a backend hands back is checked before a client sees it, and its internals are not."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence

import pytest

from modelyard import hookimpl
from modelyard.core.backend import Backend
from modelyard.core.errors import BackendError
from modelyard.core.logs import RequestInfo, bind_request, release_request
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    StreamChunk,
)
from modelyard.testing import EchoBackend, FailingBackend

#: What a runtime's own exception text looks like: a source path and a class name.
LEAKY = "/onnxruntime_src/onnxruntime/core/session.cc:42 OrtInvalidGraph: node 'x' is bad"


class OneRowEmbedder(EchoBackend):
    """Returns a single embedding however many inputs it was given."""

    name = "one-row"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        return [
            EmbeddingResult(embeddings=[[0.0, 1.0]], prompt_tokens=1)
            if isinstance(r, EmbeddingRequest) else result
            for r, result in zip(batch, await super().infer(batch), strict=True)
        ]


class ShortClassifier(EchoBackend):
    """Drops the last input's labels."""

    name = "short-classifier"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        results = await super().infer(batch)
        return [
            ClassificationResult(labels=r.labels[:-1]) if isinstance(r, ClassificationResult)
            else r
            for r in results
        ]


class WrongKind(EchoBackend):
    """Answers an embeddings request with generated text."""

    name = "wrong-kind"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        return [GenerationResult("text", "stop", 1, 1) for _ in batch]


class ExtraResult(EchoBackend):
    """One result too many for the batch."""

    name = "extra-result"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        results = await super().infer(batch)
        return [*results, results[0]]


class LeakyFailing(FailingBackend):
    """Fails with a runtime's kind of message: a path and a class name."""

    name = "leaky"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        raise ValueError(LEAKY)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        raise ValueError(LEAKY)
        yield  # pragma: no cover - makes this an async generator


class LeakyPerItem(EchoBackend):
    """Hands back a raw exception in place of one result."""

    name = "leaky-item"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        return [ValueError(LEAKY) for _ in batch]  # type: ignore[misc]


LOCAL_BACKENDS: tuple[type[Backend], ...] = (
    OneRowEmbedder, ShortClassifier, WrongKind, ExtraResult, LeakyFailing, LeakyPerItem,
)


class _Plugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        for cls in LOCAL_BACKENDS:
            register(cls)


@pytest.fixture
def host(plugin_host: PluginHost) -> Iterator[PluginHost]:
    plugin_host.register(_Plugin(), name="local-backends")
    try:
        yield plugin_host
    finally:
        plugin_host.unregister("local-backends")


@pytest.fixture
async def service(
    host: PluginHost, make_settings: Callable[..., Settings]
) -> AsyncIterator[InferenceService]:
    models = [
        {"name": "one-row", "backend": "one-row", "source": ".", "task": "embeddings"},
        {"name": "short", "backend": "short-classifier", "source": ".",
         "task": "classification"},
        {"name": "wrong", "backend": "wrong-kind", "source": ".", "task": "embeddings"},
        {"name": "extra", "backend": "extra-result", "source": ".", "task": "embeddings"},
        {"name": "leaky", "backend": "leaky", "source": ".", "task": "chat"},
        {"name": "leaky-item", "backend": "leaky-item", "source": ".", "task": "chat"},
    ]
    svc = InferenceService(make_settings(models=models), host)
    await svc.start()
    await svc.wait_until_loaded()
    try:
        yield svc
    finally:
        await svc.stop()


def _chat(text: str) -> ChatRequest:
    return ChatRequest((ChatMessage("user", text),))


async def _refused(service: InferenceService, model: str, request: InferenceRequest) -> str:
    with pytest.raises(BackendError) as caught:
        await service.infer(model, request)
    assert caught.value.status_code == 500
    return caught.value.detail


# -- results per request, rows per input ---------------------------------------------------------


async def test_one_embedding_for_two_inputs_is_500_and_counted(service: InferenceService) -> None:
    detail = await _refused(service, "one-row", EmbeddingRequest(("a", "b")))
    assert detail == "model 'one-row' returned 1 embedding row for 2 inputs"
    assert service.registry.get("one-row").breaker.snapshot()["failed_calls"] == 1
    answer = await service.infer("one-row", EmbeddingRequest(("just one",)))
    assert isinstance(answer.result, EmbeddingResult)  # one row for one input is right


async def test_classification_rows_must_match_the_inputs(service: InferenceService) -> None:
    detail = await _refused(service, "short", ClassificationRequest(("a", "b", "c")))
    assert detail == "model 'short' returned 2 classification rows for 3 inputs"


async def test_a_result_of_the_wrong_kind_is_500(service: InferenceService) -> None:
    detail = await _refused(service, "wrong", EmbeddingRequest(("a",)))
    assert detail == "model 'wrong' returned the wrong kind of result for embeddings"


async def test_the_wrong_number_of_results_for_a_batch_is_500(service: InferenceService) -> None:
    detail = await _refused(service, "extra", EmbeddingRequest(("a",)))
    assert detail == "model 'extra' returned 2 results for a batch of 1"


# -- internals stay in the log -------------------------------------------------------------------


def _assert_clean(detail: str, model: str = "leaky") -> None:
    assert detail == f"model {model!r} failed to answer"
    for internal in ("onnxruntime_src", "session.cc", "OrtInvalidGraph", "ValueError", "/"):
        assert internal not in detail


async def test_a_backend_exception_reaches_the_log_not_the_client(
    service: InferenceService, caplog: pytest.LogCaptureFixture
) -> None:
    token = bind_request(RequestInfo("req-leaky-1"))
    try:
        with caplog.at_level(logging.ERROR, logger="modelyard.core"):
            _assert_clean(await _refused(service, "leaky", _chat("hi")))
    finally:
        release_request(token)
    logged = [r for r in caplog.records if r.exc_info and LEAKY in str(r.exc_info[1])]
    assert logged, "the exception itself must be logged"
    assert logged[0].__dict__["request_ids"] == ["req-leaky-1"]


async def test_a_raw_exception_for_one_item_is_a_stable_500(
    service: InferenceService, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="modelyard.core"):
        _assert_clean(await _refused(service, "leaky-item", _chat("hi")), "leaky-item")
    assert any(r.exc_info and LEAKY in str(r.exc_info[1]) for r in caplog.records)


async def test_a_stream_that_fails_to_start_keeps_its_internals_too(
    service: InferenceService, caplog: pytest.LogCaptureFixture
) -> None:
    token = bind_request(RequestInfo("req-leaky-2"))
    try:
        with caplog.at_level(logging.ERROR, logger="modelyard.core"), \
                pytest.raises(BackendError) as caught:
            await service.stream("leaky", _chat("hi"))
    finally:
        release_request(token)
    _assert_clean(caught.value.detail)
    assert any(r.exc_info and LEAKY in str(r.exc_info[1]) for r in caplog.records)


# -- the backend's own batch limit ----------------------------------------------------------------


async def test_the_configured_batch_size_never_exceeds_the_backends(
    plugin_host: PluginHost, make_settings: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(models=[{
        "name": "c", "backend": "counting", "source": ".", "task": "embeddings",
        "options": {"max_batch_size": 2}, "batching": {"max_batch_size": 16},
    }])
    svc = InferenceService(settings, plugin_host)
    with caplog.at_level(logging.WARNING, logger="modelyard.core"):
        await svc.start()
        await svc.wait_until_loaded()
    try:
        version = svc.registry.get("c")
        assert version.batcher is not None and version.batcher.max_batch_size == 2
        assert any("exceeds the backend's limit 2" in r.getMessage() for r in caplog.records)
        await asyncio.gather(*(svc.infer("c", EmbeddingRequest((f"t{i}",))) for i in range(9)))
        calls = version.backend.calls  # type: ignore[union-attr]
        assert sum(calls) == 9 and max(calls) <= 2
    finally:
        await svc.stop()
