"""Overload: a burst past the queue is shed with 503, and shedding never opens the breaker.

The scenario of issue 19: a ``slow`` backend (20 ms a call; 250 ms over HTTP), batches of 4,
a queue of 32 and 100 requests at once. Each test is bounded: the backend's own cost (nine
batches at most) is the only wait, and the breaker's clock is a FakeClock, so an opened
breaker could not close again by itself behind the test's back.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec
import pytest

from modelyard.api.app import create_app
from modelyard.core.errors import QueueFullError
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import ChatMessage, ChatRequest, GenerationResult
from modelyard.testing import FakeClock, LiveServer, run_live_server

BURST = 100
QUEUE = 32
SLOW = {
    "backend": "slow", "source": ".", "task": "chat", "options": {"delay_s": 0.02},
    "batching": {"max_batch_size": 4, "max_queue_size": QUEUE},
}
CHAT = ChatRequest((ChatMessage("user", "hello there"),))


def _settings(make_settings: Callable[..., Settings], *extra: dict[str, Any]) -> Settings:
    return make_settings(models=[{"name": "slow", **SLOW}, *extra])


@pytest.fixture
async def start(
    plugin_host: PluginHost, fake_clock: FakeClock
) -> AsyncIterator[Callable[[Settings], Any]]:
    started: list[InferenceService] = []

    async def run(settings: Settings) -> InferenceService:
        service = InferenceService(settings, plugin_host, clock=fake_clock)
        started.append(service)
        await service.start()
        await service.wait_until_loaded()
        return service

    try:
        yield run
    finally:
        for service in started:
            await service.stop()


async def test_a_burst_past_the_queue_is_shed_and_the_breaker_stays_closed(
    start: Any, make_settings: Callable[..., Settings]
) -> None:
    service = await start(_settings(make_settings))
    outcomes = await asyncio.gather(
        *(service.infer("slow", CHAT) for _ in range(BURST)), return_exceptions=True
    )
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    shed = [o for o in outcomes if isinstance(o, QueueFullError)]
    assert len(answered) + len(shed) == BURST, [o for o in outcomes if isinstance(o, Exception)]
    assert len(answered) >= QUEUE and shed
    assert all(e.status_code == 503 and "queue full" in e.detail for e in shed)
    assert all(e.headers["Retry-After"] == "1" for e in shed)

    breaker = service.registry.get("slow").breaker
    assert breaker.state.value == "closed"
    window = breaker.snapshot()
    assert window["failed_calls"] == 0  # refusals are not calls: the window holds answers only
    assert window["calls"] == min(len(answered), breaker.settings.window_size)
    later = await service.infer("slow", CHAT)
    assert isinstance(later.result, GenerationResult)


async def test_shedding_a_canarys_load_does_not_roll_it_back(
    start: Any, make_settings: Callable[..., Settings]
) -> None:
    # Version 1 (echo) is active; version 2 (the slow one, small queue) takes every request.
    settings = make_settings(models=[
        {"name": "m", "version": "1", "backend": "echo", "source": ".", "task": "chat"},
        {"name": "m", "version": "2", **SLOW},
    ])
    service = await start(settings)
    service.start_canary("m", "2", 100.0)
    outcomes = await asyncio.gather(
        *(service.infer("m", CHAT) for _ in range(BURST)), return_exceptions=True
    )
    assert any(isinstance(o, QueueFullError) for o in outcomes)
    view = service.model_views()[0]
    assert view.last_canary_rollback is None
    assert view.canary is not None
    outcomes_seen = msgspec.to_builtins(view.canary)["outcomes"]["2"]
    assert outcomes_seen == {**outcomes_seen, "failures": 0}
    assert outcomes_seen["calls"] == sum(not isinstance(o, BaseException) for o in outcomes)


# -- the same over HTTP, against a real server on 127.0.0.1 --------------------------------------


@pytest.fixture
def live(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> Iterator[LiveServer]:
    # 250 ms a batch here: all 100 requests arrive while the first batch runs, however slowly
    # the clients connect, so the queue is sure to overflow.
    slower = {**SLOW, "options": {"delay_s": 0.25}}
    settings = make_settings(models=[{"name": "slow", **slower}])
    service = InferenceService(settings, plugin_host, clock=fake_clock)
    app = create_app(settings, plugins=plugin_host, service=service)
    with run_live_server(app) as server:
        deadline = time.monotonic() + 30
        while not service.ready():  # loading happens in the server's own loop
            assert time.monotonic() < deadline, "the live server never became ready"
            time.sleep(0.01)
        yield server


def _sample(metrics: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as exposed
    match = re.search(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{name}{{{wanted}}} not in the scrape"
    return float(match.group(1))


async def test_over_http_a_burst_gets_only_200_and_503_and_the_model_stays_in_service(
    live: LiveServer,
) -> None:
    body = {"model": "slow", "messages": [{"role": "user", "content": "hello there"}]}
    limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
    async with httpx.AsyncClient(base_url=live.url, timeout=30, limits=limits) as client:
        responses = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body) for _ in range(BURST))
        )
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503}, statuses
        assert statuses.count(200) >= QUEUE and 503 in statuses
        for refused in (r for r in responses if r.status_code == 503):
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert "queue full" in refused.json()["detail"]
            assert refused.headers["retry-after"] == "1"

        metrics = (await client.get("/metrics")).text
        model = {"model": "slow", "version": "1"}
        assert _sample(metrics, "modelyard_circuit_breaker_state", **model, state="closed") == 1
        assert _sample(metrics, "modelyard_queue_depth", **model) == 0
        later = await client.post("/v1/chat/completions", json=body)
        assert later.status_code == 200, later.text
