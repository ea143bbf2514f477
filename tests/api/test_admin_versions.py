"""Versions over the admin API: add, poll, swap (with safety), rollback, delete."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from modelyard import hookimpl
from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import EchoBackend, run_live_server

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


def _settings(make_settings: Callable[..., Settings], **server: Any) -> Settings:
    return make_settings(
        server=server,
        models=[{"name": "m", "backend": "echo", "source": ".", "task": "chat"}],
    )


async def _wait_state(client: httpx.AsyncClient, url: str, state: str) -> dict[str, Any]:
    for _ in range(500):  # bounded: loading the echo backend takes microseconds
        body = (await client.get(url)).json()
        if body["state"] == state:
            return body
        await asyncio.sleep(0.005)
    raise AssertionError(f"{url} never reached {state}: {body}")


@pytest.fixture
async def client(make_settings: Callable[..., Settings], plugin_host: PluginHost):
    settings = _settings(make_settings)
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    transport = httpx.ASGITransport(app=app)
    async with _Lifespan(service), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


class _Lifespan:
    """Start and stop the service around a test, as the app's lifespan would."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service

    async def __aenter__(self) -> None:
        await self.service.start()
        await self.service.wait_until_loaded()

    async def __aexit__(self, *exc: object) -> None:
        await self.service.stop()


async def test_add_version_is_202_with_a_url_to_poll(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/models/m/versions", json={"version": "2", "source": "."})
    assert r.status_code == 202
    assert r.headers["location"] == "/admin/models/m/versions/2"
    body = await _wait_state(client, r.headers["location"], "ready")
    assert body["progress"] == 100.0
    # A new version does not take traffic until swapped in.
    assert (await client.post("/v1/chat/completions", json=CHAT)).headers["x-model-version"] == "1"


async def test_swap_then_rollback_switch_the_answering_version(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/models/m/versions", json={"version": "2", "source": "."})
    await _wait_state(client, r.headers["location"], "ready")
    safety = (await client.get("/admin/models/m/swap/safety", params={"to": "2"})).json()
    assert safety["safe"] is True
    assert {c["name"] for c in safety["checks"]} >= {
        "target_exists",
        "target_ready",
        "target_not_active",
    }
    assert (await client.post("/admin/models/m/swap", json={"to": "2"})).status_code == 200
    assert (await client.post("/v1/chat/completions", json=CHAT)).headers["x-model-version"] == "2"
    states = {
        v["version"]: v["state"]
        for v in (await client.get("/admin/models")).json()["models"][0]["versions"]
    }
    assert states == {"1": "deprecated", "2": "active"}
    r = await client.post("/admin/models/m/rollback")
    assert r.json()["active_version"] == "1"
    assert (await client.post("/v1/chat/completions", json=CHAT)).headers["x-model-version"] == "1"


async def test_unsafe_swap_is_409_with_the_report(client: httpx.AsyncClient) -> None:
    r = await client.post("/admin/models/m/swap", json={"to": "9"})
    assert r.status_code == 409
    assert r.headers["content-type"].startswith("application/problem+json")
    failed = {c["name"] for c in r.json()["report"]["checks"] if not c["ok"]}
    assert {"target_exists", "target_ready"} <= failed
    r = await client.post("/admin/models/m/swap", json={"to": "1"})
    assert r.status_code == 409  # already active


async def test_failed_load_leaves_the_active_version_serving(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/admin/models/m/versions",
        json={"version": "2", "source": "/no/such/model", "backend": "echo"},
    )
    body = await _wait_state(client, r.headers["location"], "failed")
    assert "does not exist" in body["error"]
    assert (await client.post("/admin/models/m/swap", json={"to": "2"})).status_code == 409
    r = await client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"


async def test_delete_refuses_the_active_version_and_unloads_others(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.delete("/admin/models/m/versions/1")).status_code == 409
    r = await client.post("/admin/models/m/versions", json={"version": "2", "source": "."})
    await _wait_state(client, r.headers["location"], "ready")
    assert (await client.delete("/admin/models/m/versions/2")).status_code == 200
    assert (await client.get("/admin/models/m/versions/2")).status_code == 404
    assert (await client.delete("/admin/models/m/versions/2")).status_code == 404


async def test_rollback_without_history_is_409(client: httpx.AsyncClient) -> None:
    assert (await client.post("/admin/models/m/rollback")).status_code == 409


async def test_bad_options_for_a_new_version_name_the_body_path(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/admin/models/m/versions", json={"version": "2", "source": ".", "options": {"dim": "wide"}}
    )
    assert r.status_code == 422
    assert r.json()["detail"].startswith("$.options.dim:")


def test_swap_and_rollback_under_concurrent_load_over_real_http(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> None:
    """Clients hammer the model while it swaps to 2 and rolls back to 1: no request fails and
    each client's stream of version headers reads 1...1 2...2 1...1, switching exactly twice."""
    settings = _settings(make_settings)
    app = create_app(settings, plugins=plugin_host)

    async def scenario(url: str) -> list[list[str]]:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            for _ in range(500):
                if (await http.get("/v2/health/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            r = await http.post("/admin/models/m/versions", json={"version": "2", "source": "."})
            await _wait_state(http, r.headers["location"], "ready")
            done = asyncio.Event()
            seen: list[list[str]] = [[] for _ in range(8)]

            async def hammer(i: int) -> None:
                while not done.is_set():
                    resp = await http.post("/v1/chat/completions", json=CHAT)
                    assert resp.status_code == 200, resp.text
                    seen[i].append(resp.headers["x-model-version"])

            async def each_client_sees(count: int) -> None:
                while min(len(s) for s in seen) < count:
                    await asyncio.sleep(0.001)

            async def operate() -> None:
                await each_client_sees(10)
                assert (
                    await http.post("/admin/models/m/swap", json={"to": "2"})
                ).status_code == 200
                mark = min(len(s) for s in seen)
                await each_client_sees(mark + 20)
                assert (await http.post("/admin/models/m/rollback")).json()["active_version"] == "1"
                mark = min(len(s) for s in seen)
                await each_client_sees(mark + 20)
                done.set()

            await asyncio.gather(operate(), *(hammer(i) for i in range(8)))
            return seen

    with run_live_server(app) as server:
        seen = asyncio.run(scenario(server.url))
    for versions in seen:
        switches = sum(1 for a, b in itertools.pairwise(versions) if a != b)
        assert versions[0] == "1" and versions[-1] == "1" and switches == 2, versions
        assert "2" in versions


async def test_the_safety_report_tries_the_target_and_keeps_its_shape(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post("/admin/models/m/versions", json={"version": "2", "source": "."})
    await _wait_state(client, r.headers["location"], "ready")
    report = (await client.get("/admin/models/m/swap/safety", params={"to": "2"})).json()
    assert set(report) == {"model", "to", "from", "safe", "checks"}
    assert [c["name"] for c in report["checks"]] == [
        "target_exists", "target_ready", "no_concurrent_operation", "target_not_active",
        "target_healthy", "health_score", "same_task", "same_signature", "probe",
    ]
    assert all(set(c) == {"name", "ok", "detail"} and c["ok"] for c in report["checks"])
    assert report["safe"] is True
    health = (await client.get("/admin/models/m/versions/2")).json()["health"]
    assert health["ok"] is True and health["detail"] == "answered a chat probe"


class _RuntimeFailsToLoad(EchoBackend):
    name = "runtime-fails"

    async def load(self) -> None:
        raise RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : Load model from /srv/m.onnx failed:"
            "/onnxruntime_src/onnxruntime/core/graph/model.cc:149 onnxruntime::Model::Model"
        )


class _Plugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Any) -> None:
        register(_RuntimeFailsToLoad)


async def test_load_errors_shown_to_clients_carry_no_runtime_internals(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> None:
    plugin_host.register(_Plugin(), name="runtime-fails")
    try:
        settings = make_settings(models=[
            {"name": "m", "backend": "echo", "source": ".", "task": "chat"},
            {"name": "x", "backend": "runtime-fails", "source": ".", "task": "chat",
             "required": False},
        ])
        service = InferenceService(settings, plugin_host)
        app = create_app(settings, plugins=plugin_host, service=service)
        transport = httpx.ASGITransport(app=app)
        async with _Lifespan(service), httpx.AsyncClient(
            transport=transport, base_url="http://t"
        ) as c:
            r = await c.post("/admin/models/m/versions",
                             json={"version": "2", "source": ".", "backend": "runtime-fails"})
            added = await _wait_state(c, r.headers["location"], "failed")
            shown = [
                added["error"],
                (await c.get("/admin/models")).text,
                (await c.post("/v2/repository/index", json={})).text,
                (await c.post("/v1/chat/completions", json={**CHAT, "model": "x"})).text,
            ]
    finally:
        plugin_host.unregister("runtime-fails")
    assert added["error"].startswith("failed to load: ")
    for text in shown:
        assert "onnxruntime_src" not in text and "RuntimeError" not in text, text
        assert "ONNXRuntimeError" not in text, text
