"""Canary releases over the admin API: exact traffic share, automatic rollback, promotion."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
#: The canaries below fail on real traffic; without warm-up they load as ready (a version that
#: fails its warm-up probe never would, see tests/reliability/test_swap_safety.py).
NO_WARMUP = {"warmup": False}


@pytest.fixture
async def client(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        server={"canary_min_calls": 4, "canary_error_margin": 0.2},
        models=[{"name": "m", "backend": "echo", "source": ".", "task": "chat",
                 "probe": NO_WARMUP}],
    )
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    await service.start()
    await service.wait_until_loaded()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            yield c
    finally:
        await service.stop()


async def _add_ready(client: httpx.AsyncClient, version: str, backend: str = "echo") -> None:
    r = await client.post(
        "/admin/models/m/versions", json={"version": version, "source": ".", "backend": backend}
    )
    assert r.status_code == 202
    for _ in range(500):
        if (await client.get(r.headers["location"])).json()["state"] == "ready":
            return
        await asyncio.sleep(0.005)
    raise AssertionError("version never became ready")


async def test_canary_takes_exactly_its_share(client: httpx.AsyncClient) -> None:
    await _add_ready(client, "2")
    r = await client.post("/admin/models/m/canary", json={"to": "2", "percent": 25})
    assert r.status_code == 200 and r.json()["traffic"] == {"1": 75.0, "2": 25.0}
    seen = Counter()
    for _ in range(100):
        seen[(await client.post("/v1/chat/completions", json=CHAT)).headers["x-model-version"]] += 1
    assert seen == {"1": 75, "2": 25}
    model = (await client.get("/admin/models")).json()["models"][0]
    assert model["traffic"] == {"1": 75.0, "2": 25.0}
    assert model["canary"]["outcomes"]["2"]["calls"] == 25


async def test_failing_canary_rolls_back_by_itself(client: httpx.AsyncClient) -> None:
    await _add_ready(client, "2", backend="failing")
    assert (
        await client.post("/admin/models/m/canary", json={"to": "2", "percent": 50})
    ).status_code == 200
    statuses = Counter()
    for _ in range(40):
        statuses[(await client.post("/v1/chat/completions", json=CHAT)).status_code] += 1
    # Exactly min_calls (4) requests reached the failing canary before it was rolled back.
    assert statuses == {200: 36, 500: 4}
    model = (await client.get("/admin/models")).json()["models"][0]
    assert model["canary"] is None
    assert model["traffic"] == {"1": 100.0}
    assert "error rate" in model["last_canary_rollback"]


async def test_an_added_failing_version_never_becomes_a_canary(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> None:
    settings = make_settings(models=[{"name": "m", "backend": "echo", "source": ".",
                                      "task": "chat"}])
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    await service.start()
    await service.wait_until_loaded()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            r = await c.post("/admin/models/m/versions",
                             json={"version": "2", "source": ".", "backend": "failing"})
            for _ in range(500):
                state = (await c.get(r.headers["location"])).json()["state"]
                if state != "loading":
                    break
                await asyncio.sleep(0.002)
            assert state == "failed"  # its warm-up probe failed
            r = await c.post("/admin/models/m/canary", json={"to": "2", "percent": 50})
            assert r.status_code == 409
            statuses = Counter(
                [(await c.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(10)]
            )
            assert statuses == {200: 10}
    finally:
        await service.stop()


async def test_promote_makes_the_canary_active(client: httpx.AsyncClient) -> None:
    await _add_ready(client, "2")
    await client.post("/admin/models/m/canary", json={"to": "2", "percent": 10})
    r = await client.post("/admin/models/m/canary/promote")
    assert r.status_code == 200 and r.json()["active_version"] == "2"
    assert (await client.post("/v1/chat/completions", json=CHAT)).headers["x-model-version"] == "2"
    assert (await client.delete("/admin/models/m/canary")).status_code == 409


async def test_canary_needs_a_ready_inactive_version(client: httpx.AsyncClient) -> None:
    assert (
        await client.post("/admin/models/m/canary", json={"to": "1", "percent": 10})
    ).status_code == 409
    assert (
        await client.post("/admin/models/m/canary", json={"to": "7", "percent": 10})
    ).status_code == 404
    r = await client.post("/admin/models/m/canary", json={"to": "1", "percent": 0})
    assert r.status_code == 400


async def test_canary_rolls_back_when_its_breaker_opens(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> None:
    # The error-rate rule cannot fire (margin 100%); only the breaker can stop this canary.
    breaker = {"window_size": 4, "minimum_calls": 4, "failure_rate_threshold": 50}
    settings = make_settings(
        server={"canary_min_calls": 1000, "canary_error_margin": 1.0},
        models=[
            {"name": "m", "backend": "echo", "source": ".", "task": "chat", "breaker": breaker,
             "probe": NO_WARMUP}
        ],
    )
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    await service.start()
    await service.wait_until_loaded()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            await _add_ready(c, "2", backend="failing")
            await c.post("/admin/models/m/canary", json={"to": "2", "percent": 50})
            statuses = Counter()
            for _ in range(40):
                statuses[(await c.post("/v1/chat/completions", json=CHAT)).status_code] += 1
            assert statuses == {200: 36, 500: 4}  # the 4th failure opened the breaker
            model = (await c.get("/admin/models")).json()["models"][0]
            assert model["canary"] is None
            assert model["last_canary_rollback"] == "the canary's circuit breaker opened"
    finally:
        await service.stop()
