"""A request whose client went away while it waited in the queue is never executed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import HangingBackend, run_live_server

BODY = {"model": "h", "input": "x"}


def _wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def test_disconnected_queued_request_never_reaches_the_backend(
    make_settings: Callable[..., Settings], plugin_host: PluginHost
) -> None:
    settings = make_settings(models=[{
        "name": "h", "backend": "hanging", "source": ".", "task": "embeddings",
        "batching": {"max_batch_size": 1},
    }])
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)

    async def scenario(url: str) -> int:
        async with httpx.AsyncClient(base_url=url, timeout=30) as patient:
            first = asyncio.ensure_future(patient.post("/v1/embeddings", json=BODY))
            version = service.registry.get("h")
            backend = version.backend
            assert isinstance(backend, HangingBackend) and version.batcher is not None
            await _until(lambda: backend.calls == [1], "the first request to occupy the backend")
            async with httpx.AsyncClient(base_url=url) as impatient:
                second = asyncio.ensure_future(impatient.post("/v1/embeddings", json=BODY))
                await _until(lambda: version.batcher.depth == 1, "the second request to queue")
                second.cancel()  # the client goes away: its connection closes
            await _until(lambda: _cancelled(version.batcher), "the queued request to be cancelled")
            backend.open_gate()
            assert (await first).status_code == 200
            return len(backend.calls)

    with run_live_server(app) as server:
        _wait_for(service.ready, "ready")
        calls = asyncio.run(scenario(server.url))
    assert calls == 1  # the abandoned request was never executed


async def _until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def _cancelled(batcher: object) -> bool:
    queue = batcher._queue
    return all(p.future.done() for p in queue)
