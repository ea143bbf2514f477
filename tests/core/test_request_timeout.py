"""Deadlines: a stuck request is 504, its queue slot comes back, a stuck backend is noticed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from modelyard.core.errors import QueueFullError, ServiceUnavailableError, TimeoutError_
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import ModelVersion
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import EmbeddingRequest
from modelyard.testing import FakeClock, HangingBackend, StuckBackend

REQ = EmbeddingRequest(("x",))


async def _until(condition: Callable[[], bool], *, turns: int = 10_000) -> None:
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_model_timeout_ms_gives_504_and_the_queued_request_is_skipped(
    make_settings, plugin_host
) -> None:
    settings = make_settings(
        server={"request_timeout_s": 300},
        models=[{"name": "h", "backend": "hanging", "source": ".", "task": "embeddings",
                 "batching": {"max_batch_size": 1, "timeout_ms": 50}}],
    )
    service = InferenceService(settings, plugin_host)
    await service.start()
    await service.wait_until_loaded()
    try:
        first = asyncio.ensure_future(service.infer("h", EmbeddingRequest(("a",))))
        with pytest.raises(TimeoutError_) as caught:
            await service.infer("h", EmbeddingRequest(("b",)))  # waits behind the first
        assert caught.value.status_code == 504
        backend = service.registry.get("h").backend
        assert isinstance(backend, HangingBackend)
        with pytest.raises(TimeoutError_):
            await first
        backend.open_gate()
        # The worker finishes the first call; the expired second one must be skipped.
        batcher = service.registry.get("h").batcher
        for _ in range(1000):
            if batcher.depth == 0:
                break
            await asyncio.sleep(0)
        assert backend.calls == [1]
    finally:
        await service.stop()


# -- the burst of issue 19: breaker off, queue 8, batch 2, a hanging backend -------------------


Start = Callable[..., Any]


@pytest.fixture
async def start(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> AsyncIterator[Start]:
    started: list[InferenceService] = []

    async def run(backend: str, **breaker: Any) -> InferenceService:
        settings = make_settings(models=[{
            "name": "h", "backend": backend, "source": ".", "task": "embeddings",
            "batching": {"max_batch_size": 2, "max_queue_size": 8, "timeout_ms": 50},
            "breaker": {"enabled": False, **breaker},
        }])
        service = InferenceService(settings, plugin_host, clock=fake_clock)
        started.append(service)
        await service.start()
        await service.wait_until_loaded()
        return service

    try:
        yield run
    finally:
        for service in started:
            version = service.registry.get("h")
            if isinstance(version.backend, HangingBackend):
                version.backend.open_gate()
            await service.stop()


async def _burst(service: InferenceService, n: int = 20) -> list[BaseException]:
    outcomes = await asyncio.gather(
        *(service.infer("h", REQ) for _ in range(n)), return_exceptions=True
    )
    assert all(isinstance(o, BaseException) for o in outcomes), "a hung model answered"
    return [o for o in outcomes if isinstance(o, BaseException)]


def _version(service: InferenceService) -> ModelVersion:
    return service.registry.get("h")


async def test_a_burst_on_a_hung_model_gives_every_slot_back(start: Start) -> None:
    service = await start("hanging")
    version = _version(service)
    assert version.batcher is not None and isinstance(version.backend, HangingBackend)
    errors = await _burst(service)
    # All 20 arrive before the worker wakes: 8 queue (2 of them then enter the backend).
    assert sum(isinstance(e, QueueFullError) for e in errors) == 12
    assert sum(isinstance(e, TimeoutError_) for e in errors) == 8
    assert version.batcher.depth == 0  # 6 timed out in the queue: their slots are back
    await _until(lambda: version.batcher is not None and version.batcher.in_flight == 0)

    # Later requests reach the (still hung) backend and get their own 504, never "queue full".
    for _ in range(3):
        with pytest.raises(TimeoutError_):
            await service.infer("h", REQ)
    assert version.backend.calls[-3:] == [1, 1, 1]
    assert version.batcher.depth == 0


async def test_a_call_that_cannot_be_cancelled_marks_the_version_unhealthy(
    start: Start, fake_clock: FakeClock
) -> None:
    service = await start("stuck")
    version = _version(service)
    batcher = version.batcher
    assert batcher is not None
    errors = await _burst(service)
    assert sum(isinstance(e, TimeoutError_) for e in errors) == 8
    assert batcher.depth == 0 and batcher.in_flight == 1  # the call goes on regardless

    fake_clock.advance(batcher.stuck_after_s)
    with pytest.raises(ServiceUnavailableError, match="model 'h' is unhealthy") as refused:
        await service.infer("h", REQ)  # at once: nothing queues behind a stuck call
    assert refused.value.headers["Retry-After"]
    assert batcher.stuck_calls == 1
    assert version.health is not None and not version.health.ok
    metrics = service.metrics_exposition()[0].decode()
    assert 'modelyard_stuck_backend_calls_total{model="h",version="1"} 1.0' in metrics

    assert isinstance(version.backend, StuckBackend)
    version.backend.open_gate()  # the native call returns at last
    await _until(lambda: batcher.unhealthy == "")
    assert (await service.infer("h", REQ)).result is not None


async def test_with_the_breaker_on_a_stuck_call_opens_it(
    start: Start, fake_clock: FakeClock
) -> None:
    # A window too large for the burst's ten 504s to decide: only the stuck call opens it.
    service = await start("stuck", enabled=True, window_size=100, minimum_calls=100)
    version = _version(service)
    assert version.batcher is not None
    await _burst(service)
    fake_clock.advance(version.batcher.stuck_after_s)
    assert version.batcher.unhealthy
    assert version.breaker.state.value == "open"
    with pytest.raises(ServiceUnavailableError, match="circuit breaker is open"):
        await service.infer("h", REQ)
