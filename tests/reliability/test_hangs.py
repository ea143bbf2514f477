"""Hangs over HTTP: a hung model gives its queue slots back and keeps answering promptly.

The scenario of issue 19 against a real server on 127.0.0.1: breaker off, a queue of 8,
batches of 2, a backend that never answers, 20 requests at once. Bounded: requests time out
after 300 ms, every poll has a deadline, and the batcher's clock is a FakeClock, so the test
decides when an abandoned backend call has been stuck for long enough.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import ModelVersion
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import (
    FakeClock,
    HangingBackend,
    LiveServer,
    StuckBackend,
    run_live_server,
    wait_until,
)

BURST = 20
QUEUE = 8
BODY = {"model": "h", "input": "x"}


@dataclass
class Live:
    server: LiveServer
    service: InferenceService
    clock: FakeClock

    @property
    def version(self) -> ModelVersion:
        return self.service.registry.get("h")


@pytest.fixture(params=["hanging", "stuck"])
def live(
    request: pytest.FixtureRequest, plugin_host: PluginHost,
    make_settings: Callable[..., Settings], fake_clock: FakeClock,
) -> Iterator[Live]:
    settings = make_settings(models=[{
        "name": "h", "backend": request.param, "source": ".", "task": "embeddings",
        "batching": {"max_batch_size": 2, "max_queue_size": QUEUE, "timeout_ms": 300},
        "breaker": {"enabled": False},
    }])
    service = InferenceService(settings, plugin_host, clock=fake_clock)
    app = create_app(settings, plugins=plugin_host, service=service)
    with run_live_server(app) as server:
        wait_until(service.ready, "the server to be ready")
        live = Live(server, service, fake_clock)
        try:
            yield live
        finally:
            backend = live.version.backend
            if isinstance(backend, HangingBackend):
                backend.open_gate()


def _sample(metrics: str, name: str) -> float:
    match = re.search(rf'^{name}{{model="h",version="1"}} (\S+)$', metrics, re.MULTILINE)
    assert match, f"{name} not in the scrape"
    return float(match.group(1))


async def _burst(client: httpx.AsyncClient) -> list[httpx.Response]:
    responses = await asyncio.gather(
        *(client.post("/v1/embeddings", json=BODY) for _ in range(BURST))
    )
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {503, 504}, statuses
    # The queue holds eight, the first batch up to two more (none when all 20 arrive before the
    # worker wakes): the rest are shed at once.
    assert QUEUE <= statuses.count(504) <= QUEUE + 2, statuses
    for shed in (r for r in responses if r.status_code == 503):
        assert "queue full" in shed.json()["detail"]
    return responses


async def test_a_burst_on_a_hung_model_gives_the_queue_back(live: Live) -> None:
    async with httpx.AsyncClient(base_url=live.server.url, timeout=30) as client:
        await _burst(client)
        metrics = (await client.get("/metrics")).text
        assert _sample(metrics, "modelyard_queue_depth") == 0  # at once: no worker needed

        later = await client.post("/v1/embeddings", json=BODY)
        if isinstance(live.version.backend, StuckBackend):
            # The stuck call still holds the worker: the request waits its own 300 ms.
            assert later.status_code == 504, later.text
            live.clock.advance(live.version.batcher.stuck_after_s)  # type: ignore[union-attr]
            refused = await client.post("/v1/embeddings", json=BODY)
            assert refused.status_code == 503, refused.text
            assert "is unhealthy" in refused.json()["detail"]
            assert refused.headers["retry-after"]
            metrics = (await client.get("/metrics")).text
            assert _sample(metrics, "modelyard_stuck_backend_calls_total") == 1
            models = (await client.get("/admin/models")).json()["models"]
            health: Any = models[0]["versions"][0]["health"]
            assert health["ok"] is False and "not returned" in health["detail"]
        else:
            # The hung call was cancelled once its callers left: the next one is tried.
            assert later.status_code == 504, later.text
            assert "did not answer within 0.3s" in later.json()["detail"]
        metrics = (await client.get("/metrics")).text
        assert _sample(metrics, "modelyard_queue_depth") == 0
