"""On-demand models over HTTP, through the app in-process: listed before they load, loaded by
a request, refused with 503 + Retry-After when the budget is held by a busy model, and shown
with their memory in ``/admin/models``."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from conftest import StartApi
from modelyard import hookimpl
from modelyard.core.backend import Backend
from modelyard.core.plugins import PluginHost
from modelyard.core.types import InferenceRequest, InferenceResult
from modelyard.testing import EchoBackend


class GatedBackend(EchoBackend):
    """An echo of 64 bytes whose answers wait at ``gate`` once ``entered`` is set."""

    name = "gated"
    gate: asyncio.Event
    entered: asyncio.Event

    def memory_bytes(self) -> int:
        return 64

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        GatedBackend.entered.set()
        await GatedBackend.gate.wait()
        return await super().infer(batch)


class _Plugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(GatedBackend)


@pytest.fixture
def gated(plugin_host: PluginHost) -> Iterator[None]:
    GatedBackend.gate, GatedBackend.entered = asyncio.Event(), asyncio.Event()
    plugin_host.register(_Plugin(), name="gated")
    try:
        yield
    finally:
        plugin_host.unregister("gated")


def chat(name: str) -> dict[str, Any]:
    return {"model": name, "messages": [{"role": "user", "content": "hello there"}]}


def metric(text: str, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    braces = f"{{{re.escape(wanted)}}}" if labels else ""
    match = re.search(rf"^{name}{braces} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_on_demand_models_load_when_asked_and_stay_within_one_slot(
    start_api: StartApi, gated: None, problem: Callable[..., dict[str, Any]]
) -> None:
    on_demand = {"source": ".", "task": "chat", "load": "on_demand"}
    api = await start_api(
        {"name": "a", "backend": "gated", **on_demand},
        {"name": "b", "backend": "echo", **on_demand},
        server={"max_loaded_models": 1},
    )
    client = api.client
    assert (await client.get("/v2/health/ready")).status_code == 200  # nothing loaded yet
    listed = (await client.get("/v1/models")).json()["data"]
    assert [m["id"] for m in listed] == ["a", "b"]
    index = {r["name"]: r for r in (await client.get("/v2/repository/index")).json()}
    assert index["a"]["state"] == "UNAVAILABLE" and "loads on its first request" in (
        index["a"]["reason"]
    )

    GatedBackend.gate.set()
    for name in ["a", "b", "a"]:
        answered = await client.post("/v1/chat/completions", json=chat(name))
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-model-name"] == name

    overview = (await client.get("/admin/models")).json()
    assert overview["memory"] == {"used_bytes": 64, "budget_bytes": None, "loaded": 1,
                                  "max_loaded": 1}
    versions = {m["name"]: m["versions"][0] for m in overview["models"]}
    assert (versions["a"]["memory_bytes"], versions["a"]["load"]) == (64, "on_demand")
    assert (versions["b"]["memory_bytes"], versions["b"]["state"]) == (0, "unloaded")

    # a is busy: b cannot be loaded, and a is not evicted from under its request.
    GatedBackend.gate, GatedBackend.entered = asyncio.Event(), asyncio.Event()
    held = asyncio.create_task(client.post("/v1/chat/completions", json=chat("a")))
    await GatedBackend.entered.wait()
    refused = await client.post("/v1/chat/completions", json=chat("b"))
    body = problem(refused, 503)
    assert refused.headers["retry-after"] == "2"
    assert body["detail"].startswith("no room to load model 'b' version '1'")
    GatedBackend.gate.set()
    assert (await held).status_code == 200
    assert (await client.post("/v1/chat/completions", json=chat("b"))).status_code == 200

    scrape = (await client.get("/metrics")).text
    assert metric(scrape, "modelyard_model_evictions_total", model="a", reason="budget") == 2
    assert metric(scrape, "modelyard_model_loads_total", model="a", outcome="loaded") == 2
    assert metric(scrape, "modelyard_loaded_models") == 1
    assert metric(scrape, "modelyard_max_loaded_models") == 1
