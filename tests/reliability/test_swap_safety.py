"""Swap safety tries the new version: warm-up and the safety check send it real requests.

Over HTTP with the app in-process (the service runs in the test's loop), fake backends only.
A version that cannot answer its task is ``failed`` at warm-up or refused at swap (409 with
the report), and the active version keeps serving throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from modelyard import hookimpl
from modelyard.api.app import create_app
from modelyard.core.backend import Backend, BackendInfo
from modelyard.core.errors import BadRequestError, ConflictError
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import VersionState
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import (
    InferenceRequest,
    InferenceResult,
    Tensor,
    TensorRequest,
    TensorResult,
    TensorSpec,
)
from modelyard.testing import EchoBackend

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
LEAKS = ("Traceback", 'File "', "site-packages", ".py\", line")


class RefusedTemplateBackend(EchoBackend):
    """A GGUF whose chat template the sandbox refuses: loads, then refuses every chat."""

    name = "refused-template"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        raise BadRequestError("chat template: the sandbox refused access to attribute '__class__'")


class OtherTensorsBackend(EchoBackend):
    """A tensor model with other inputs than the echo's INPUT0 / OUTPUT0."""

    name = "other-tensors"

    def info(self) -> BackendInfo:
        return BackendInfo(
            inputs=[TensorSpec("IMAGE", "UINT8", (-1, 3, 4, 4))],
            outputs=[TensorSpec("LOGITS", "FP32", (-1, 10))],
        )

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        results: list[InferenceResult] = []
        for request in batch:
            assert isinstance(request, TensorRequest)
            (image,) = request.inputs
            assert image.shape == (1, 3, 4, 4) and set(image.data) == {0}
            results.append(TensorResult([Tensor("LOGITS", "FP32", (1, 10), [0.0] * 10)]))
        return results


class _Fakes:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(RefusedTemplateBackend)
        register(OtherTensorsBackend)


Start = Callable[..., Any]


@pytest.fixture
async def serve(
    plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> AsyncIterator[Start]:
    """``await serve({model}, ..., server={...})`` -> (service, client), models loaded."""
    plugin_host.register(_Fakes(), name="swap-fakes")
    try:
        async with contextlib.AsyncExitStack() as stack:

            async def start(
                *models: dict[str, Any], **tables: Any
            ) -> tuple[InferenceService, httpx.AsyncClient]:
                settings = make_settings(models=list(models), **tables)
                service = InferenceService(settings, plugin_host)
                app = create_app(settings, plugins=plugin_host, service=service)
                await service.start()
                stack.push_async_callback(service.stop)
                await service.wait_until_loaded()
                client = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://t"
                )
                await stack.enter_async_context(client)
                return service, client

            yield start
    finally:
        plugin_host.unregister("swap-fakes")


def chat_model(**extra: Any) -> dict[str, Any]:
    return {"name": "m", "backend": "echo", "source": ".", "task": "chat", **extra}


async def add_version(client: httpx.AsyncClient, state: str, **body: Any) -> dict[str, Any]:
    """Add version "2" and wait (bounded) until it is ``state``; its view."""
    r = await client.post("/admin/models/m/versions", json={"version": "2", "source": ".", **body})
    assert r.status_code == 202, r.text
    for _ in range(1000):
        view: dict[str, Any] = (await client.get(r.headers["location"])).json()
        if view["state"] not in ("loading", None):
            assert view["state"] == state, view
            return view
        await asyncio.sleep(0.002)
    raise AssertionError(f"version 2 never left loading: {view}")


async def assert_version_1_serves(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        r = await client.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200 and r.headers["x-model-version"] == "1", r.text
    models = (await client.get("/admin/models")).json()["models"]
    assert models[0]["active_version"] == "1"


async def refused_swap(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """The swap is 409 problem+json carrying the report; its checks by name."""
    r = await client.post("/admin/models/m/swap", json={"to": "2"})
    assert r.status_code == 409, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    report = r.json()["report"]
    assert set(report) == {"model", "to", "from", "safe", "checks"}
    assert report["safe"] is False and report["from"] == "1" and report["to"] == "2"
    return {c["name"]: c for c in report["checks"]}


async def test_a_version_whose_backend_fails_every_call_is_failed_at_warm_up(serve: Start) -> None:
    _, client = await serve(chat_model())
    view = await add_version(client, "failed", backend="failing")
    assert view["error"].startswith("warm-up probe failed: ")
    assert view["health"]["ok"] is False
    for leak in LEAKS:
        assert leak not in view["error"]
    checks = await refused_swap(client)
    assert checks["target_ready"]["ok"] is False
    await assert_version_1_serves(client)


async def test_without_warm_up_the_swap_probe_refuses_a_failing_version(serve: Start) -> None:
    service, client = await serve(chat_model(probe={"warmup": False}))
    await add_version(client, "ready", backend="failing")
    calls_before = len(service.registry.entry("m").versions["2"].backend.calls)  # type: ignore[union-attr]

    safety = (await client.get("/admin/models/m/swap/safety", params={"to": "2"})).json()
    assert safety["safe"] is False
    checks = {c["name"]: c for c in safety["checks"]}
    assert checks["probe"]["ok"] is False and checks["probe"]["detail"]
    assert checks["same_task"]["ok"] is True
    # The check sent the version a real request.
    assert len(service.registry.entry("m").versions["2"].backend.calls) > calls_before  # type: ignore[union-attr]

    checks = await refused_swap(client)
    assert checks["probe"]["ok"] is False
    await assert_version_1_serves(client)
    versions = (await client.get("/admin/models")).json()["models"][0]["versions"]
    assert {v["version"]: v["health"]["ok"] for v in versions if v["health"]} == {"2": False}


async def test_a_version_serving_another_task_is_refused_at_swap(serve: Start) -> None:
    _, client = await serve(chat_model())
    await add_version(client, "ready", task="embeddings")  # it answers its own probe
    safety = (await client.get("/admin/models/m/swap/safety", params={"to": "2"})).json()
    checks = {c["name"]: c for c in safety["checks"]}
    assert checks["probe"]["ok"] is True
    assert checks["same_task"] == {"name": "same_task", "ok": False,
                                   "detail": "chat -> embeddings"}
    checks = await refused_swap(client)
    assert checks["same_task"]["ok"] is False
    await assert_version_1_serves(client)


async def test_a_chat_template_the_sandbox_refuses_fails_warm_up(serve: Start) -> None:
    _, client = await serve(chat_model())
    view = await add_version(client, "failed", backend="refused-template")
    assert view["error"] == (
        "warm-up probe failed: chat template: the sandbox refused access to attribute '__class__'"
    )
    await refused_swap(client)
    await assert_version_1_serves(client)


async def test_promoting_a_canary_that_fails_its_probe_is_refused(serve: Start) -> None:
    _, client = await serve(chat_model(probe={"warmup": False}))
    await add_version(client, "ready", backend="failing")
    r = await client.post("/admin/models/m/canary", json={"to": "2", "percent": 1})
    assert r.status_code == 200
    r = await client.post("/admin/models/m/canary/promote")
    assert r.status_code == 409
    assert {c["name"]: c["ok"] for c in r.json()["report"]["checks"]}["probe"] is False
    assert (await client.get("/admin/models")).json()["models"][0]["active_version"] == "1"


async def test_embeddings_of_another_width_are_refused(serve: Start) -> None:
    service, client = await serve(
        {"name": "m", "backend": "echo", "source": ".", "task": "embeddings", "options": {"dim": 8}}
    )
    await add_version(client, "ready", options={"dim": 16})
    checks = await refused_swap(client)
    assert checks["same_signature"] == {"name": "same_signature", "ok": False,
                                        "detail": "8 -> 16 dimensions"}
    assert service.registry.entry("m").active_version == "1"


async def test_embeddings_of_the_same_width_swap(serve: Start) -> None:
    _, client = await serve(
        {"name": "m", "backend": "echo", "source": ".", "task": "embeddings", "options": {"dim": 8}}
    )
    await add_version(client, "ready")
    r = await client.post("/admin/models/m/swap", json={"to": "2"})
    assert r.status_code == 200, r.text
    checks = {c["name"]: c for c in r.json()["report"]["checks"]}
    assert checks["same_signature"]["detail"] == "8 -> 8 dimensions"
    assert checks["probe"]["ok"] is True


async def test_a_tensor_model_with_other_inputs_is_refused(serve: Start) -> None:
    _, client = await serve({"name": "m", "backend": "echo", "source": ".", "task": "tensor"})
    await add_version(client, "ready", backend="other-tensors")  # zeros for IMAGE [1,3,4,4]
    checks = await refused_swap(client)
    assert checks["probe"]["ok"] is True
    assert checks["same_signature"]["ok"] is False
    assert checks["same_signature"]["detail"] == "inputs differ: ['INPUT0'] -> ['IMAGE']"


async def test_a_hanging_version_fails_warm_up_within_the_probe_timeout(serve: Start) -> None:
    service, client = await serve(chat_model(), server={"probe_timeout_s": 0.05})
    view = await add_version(client, "failed", backend="hanging")
    assert view["error"] == "warm-up probe failed: no answer within 0.05s"
    # Failed versions hold nothing: the backend is unloaded and the batcher stopped.
    version = service.registry.entry("m").versions["2"]
    assert version.backend is None and version.batcher is None
    await assert_version_1_serves(client)


async def test_configured_versions_warm_up_when_the_server_says_all(serve: Start) -> None:
    service, client = await serve(
        chat_model(), {"name": "bad", "backend": "failing", "source": ".", "task": "chat"},
        server={"warmup": "all"},
    )
    bad = service.registry.entry("bad").versions["1"]
    assert bad.state == VersionState.FAILED
    assert bad.error.startswith("warm-up probe failed: ")
    r = await client.post("/v1/chat/completions", json={**CHAT, "model": "bad"})
    assert r.status_code == 503 and "warm-up probe failed" in r.json()["detail"]
    assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_the_service_refuses_an_unsafe_swap_and_keeps_the_active_version(
    serve: Start,
) -> None:
    service, _ = await serve(chat_model(), chat_model(version="2", task="completion"))
    with pytest.raises(ConflictError) as caught:
        await service.swap("m", "2")
    assert caught.value.status_code == 409
    report = caught.value.extra["report"]
    assert {c["name"]: c["ok"] for c in report["checks"]}["same_task"] is False
    assert service.registry.entry("m").active_version == "1"
