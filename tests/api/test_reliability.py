"""Circuit breakers and failover aliases through the HTTP API (fake backends, fake clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import FakeClock

BREAKER = {"window_size": 4, "minimum_calls": 4, "wait_in_open_ms": 30_000}


def chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def served(
    make_settings: Callable[..., Settings], plugin_host: PluginHost, fake_clock: FakeClock
) -> AsyncIterator[tuple[InferenceService, httpx.AsyncClient]]:
    settings = make_settings(
        models=[
            {"name": "bad", "backend": "failing", "source": ".", "task": "chat",
             "breaker": BREAKER},
            {"name": "good", "backend": "echo", "source": ".", "task": "chat",
             "breaker": BREAKER},
        ],
        aliases=[{"name": "chat", "targets": ["bad", "good:1"]},
                 {"name": "broken", "targets": ["bad"]}],
    )
    service = InferenceService(settings, plugin_host, clock=fake_clock)
    app = create_app(settings, plugins=plugin_host, service=service)
    await service.start()
    await service.wait_until_loaded()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            yield service, c
    finally:
        await service.stop()


def backend_calls(service: InferenceService, name: str) -> int:
    backend = service.registry.entry(name).versions["1"].backend
    return len(backend.calls)  # type: ignore[union-attr]


async def test_an_open_breaker_answers_503_with_retry_after_without_the_backend(
    served: tuple[InferenceService, httpx.AsyncClient], fake_clock: FakeClock
) -> None:
    service, client = served
    for _ in range(4):
        assert (await client.post("/v1/chat/completions", json=chat("bad"))).status_code == 500
    fake_clock.advance(5)
    r = await client.post("/v1/chat/completions", json=chat("bad"))
    assert r.status_code == 503 and r.headers["retry-after"] == "25"
    assert backend_calls(service, "bad") == 4
    models = {m["name"]: m for m in (await client.get("/admin/models")).json()["models"]}
    breaker = models["bad"]["versions"][0]["breaker"]
    assert breaker["state"] == "open" and breaker["failure_rate"] == 100.0
    meta = (await client.get("/v2/models/bad")).json()
    assert meta["parameters"]["breaker"]["state"] == "open"


async def test_an_alias_fails_over_and_says_who_answered(
    served: tuple[InferenceService, httpx.AsyncClient],
) -> None:
    service, client = served
    for _ in range(5):
        r = await client.post("/v1/chat/completions", json=chat("chat"))
        assert r.status_code == 200 and r.headers["x-model-name"] == "good"
        assert r.json()["model"] == "good"
    assert backend_calls(service, "bad") == 4, "the fifth request skipped the open breaker"
    aliases = (await client.get("/admin/models")).json()["aliases"]
    assert aliases[0]["name"] == "chat" and aliases[0]["failovers"] == 5
    assert aliases[0]["target_states"] == {"bad": "open", "good:1": "closed"}
    meta = (await client.get("/v2/models/chat")).json()
    assert meta["name"] == "chat" and meta["parameters"]["alias_of"] == ["bad", "good:1"]


async def test_an_alias_with_every_target_down_is_503(
    served: tuple[InferenceService, httpx.AsyncClient], fake_clock: FakeClock
) -> None:
    _, client = served
    for _ in range(4):
        r = await client.post("/v1/chat/completions", json=chat("broken"))
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    fake_clock.advance(10)
    r = await client.post("/v1/chat/completions", json=chat("broken"))
    assert r.status_code == 503 and r.headers["retry-after"] == "20"
    assert r.json()["attempts"][0]["outcome"] == "refused"


async def test_an_alias_streams_from_the_target_that_answers(
    served: tuple[InferenceService, httpx.AsyncClient],
) -> None:
    _, client = served
    r = await client.post("/v1/chat/completions", json={**chat("chat"), "stream": True})
    assert r.status_code == 200 and "data:" in r.text


async def test_v2_infer_through_an_alias(
    served: tuple[InferenceService, httpx.AsyncClient],
) -> None:
    _, client = served
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]}]}
    r = await client.post("/v2/models/chat/infer", json=body)
    assert r.status_code == 200 and r.json()["model_name"] == "good"


def test_an_alias_to_an_unknown_model_is_a_config_error(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> None:
    settings = make_settings(
        models=[{"name": "good", "backend": "echo", "source": ".", "task": "chat"}],
        aliases=[{"name": "chat", "targets": ["good", "nope:2"]}],
    )
    with pytest.raises(ConfigError, match=r"\$\.aliases\[0\]\.targets\[1\]"):
        InferenceService(settings, plugin_host)
