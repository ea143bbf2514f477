"""On-demand models against a real server on 127.0.0.1 (issue 21's "done when").

Two on-demand echo models and room for one (``max_loaded_models = 1``): requests that
alternate between them are all answered, each after its model's load; and a model serving a
request is never evicted: a request for another model meanwhile gets 503 with Retry-After.
Bounded: the one poll (for the held request to reach its backend) has a deadline, and the
held request is released by the test, never by a timer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import FakeClock, HangingBackend, LiveServer, run_live_server

ON_DEMAND = {"source": ".", "task": "chat", "load": "on_demand"}


@pytest.fixture
def live(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> Iterator[tuple[LiveServer, InferenceService]]:
    settings = make_settings(
        server={"max_loaded_models": 1},
        models=[
            {"name": "a", "backend": "echo", **ON_DEMAND},
            {"name": "b", "backend": "echo", **ON_DEMAND},
            {"name": "h", "backend": "hanging", **ON_DEMAND},
        ],
    )
    service = InferenceService(settings, plugin_host, clock=fake_clock)
    app = create_app(settings, plugins=plugin_host, service=service)
    with run_live_server(app) as server:
        yield server, service
        for entry in service.registry:  # a failed test must not leave a request hanging
            for version in entry.versions.values():
                if isinstance(version.backend, HangingBackend):
                    version.backend.open_gate()


def chat(name: str) -> dict[str, Any]:
    return {"model": name, "messages": [{"role": "user", "content": "hello there"}]}


async def _in_flight(client: httpx.AsyncClient, name: str) -> None:
    deadline = time.monotonic() + 10
    while True:  # bounded poll of the admin view: the server runs in its own thread
        models = (await client.get("/admin/models")).json()["models"]
        if {m["name"]: m["versions"][0]["in_flight"] for m in models}[name] == 1:
            return
        assert time.monotonic() < deadline, f"{name} never had a request in flight"
        await asyncio.sleep(0.01)


async def test_alternating_requests_are_answered_and_a_busy_model_is_never_evicted(
    live: tuple[LiveServer, InferenceService],
) -> None:
    server, service = live
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        assert (await client.get("/v2/health/ready")).status_code == 200
        for name in ["a", "b", "a", "b", "a", "b"]:
            answered = await client.post("/v1/chat/completions", json=chat(name))
            assert answered.status_code == 200, answered.text
            assert answered.json()["choices"][0]["message"]["content"] == "hello there"
            memory = (await client.get("/admin/models")).json()["memory"]
            assert (memory["loaded"], memory["max_loaded"]) == (1, 1)

        held = asyncio.create_task(client.post("/v1/chat/completions", json=chat("h")))
        await _in_flight(client, "h")
        for name in ["a", "b"]:
            refused = await client.post("/v1/chat/completions", json=chat(name))
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.headers["retry-after"] == "2"
            assert refused.json()["detail"].startswith(f"no room to load model {name!r}")

        backend = service.registry.entry("h").versions["1"].backend
        assert isinstance(backend, HangingBackend)  # still loaded: never evicted
        backend.open_gate()
        assert (await held).status_code == 200
        answered = await client.post("/v1/chat/completions", json=chat("a"))
        assert answered.status_code == 200, answered.text

        scrape = (await client.get("/metrics")).text
        assert 'modelyard_model_evictions_total{model="h",reason="budget"} 1.0' in scrape
        assert 'modelyard_model_loads_total{model="a",outcome="loaded"} 4.0' in scrape
