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
    queue = getattr(batcher, "_queue")
    return all(p.future.done() for p in queue)


# -- the middleware alone, against a scripted server ------------------------------------------


class ScriptedServer:
    """``receive`` hands out ``messages`` in order, then waits for ``disconnect()``."""

    def __init__(self, *messages: dict[str, object]) -> None:
        self.messages = list(messages)
        self.left = asyncio.Event()
        self.sent: list[dict[str, object]] = []
        self.receives = 0

    async def receive(self) -> dict[str, object]:
        self.receives += 1
        if self.messages:
            return self.messages.pop(0)
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)

    def disconnect(self) -> None:
        self.left.set()


def _scope(body: bool) -> dict[str, object]:
    headers = [(b"content-length", b"4")] if body else []
    return {"type": "http", "method": "POST" if body else "GET", "path": "/", "headers": headers}


async def _respond(send: object) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]


async def test_a_request_without_a_body_still_reads_an_empty_one() -> None:
    from modelyard.api.disconnect import CancelOnDisconnect

    server = ScriptedServer({"type": "http.request", "body": b"", "more_body": False})
    seen = []

    async def app(scope: object, receive: object, send: object) -> None:
        seen.append(await receive())  # type: ignore[operator]
        await _respond(send)

    await asyncio.wait_for(CancelOnDisconnect(app)(_scope(False), server.receive, server.send), 5)
    assert seen == [{"type": "http.request", "body": b"", "more_body": False}]
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]


async def test_a_disconnect_after_the_body_cancels_the_waiting_handler() -> None:
    from modelyard.api.disconnect import CancelOnDisconnect

    server = ScriptedServer(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    body, stopped = bytearray(), []
    waiting = asyncio.Event()

    async def app(scope: object, receive: object, send: object) -> None:
        while True:
            message = await receive()  # type: ignore[operator]
            body.extend(message["body"])
            if not message["more_body"]:
                break
        try:
            waiting.set()
            await asyncio.Event().wait()  # queued behind a busy backend
        except asyncio.CancelledError:
            stopped.append("cancelled")
            raise

    call = asyncio.ensure_future(CancelOnDisconnect(app)(_scope(True), server.receive, server.send))
    await asyncio.wait_for(waiting.wait(), 5)
    server.disconnect()
    await asyncio.wait_for(call, 5)  # returns quietly: the cancel was the middleware's own
    assert bytes(body) == b"abcd" and stopped == ["cancelled"] and server.sent == []


async def test_work_after_the_response_ends_is_not_cancelled_by_the_closing_disconnect() -> None:
    from modelyard.api.disconnect import CancelOnDisconnect

    server = ScriptedServer({"type": "http.request", "body": b"abcd", "more_body": False})
    finished = []

    async def app(scope: object, receive: object, send: object) -> None:
        await receive()  # type: ignore[operator]
        await _respond(send)
        server.disconnect()  # what uvicorn's receive says once the response is complete
        for _ in range(20):
            await asyncio.sleep(0)
        finished.append(True)  # e.g. metrics and access lines written after the response

    await asyncio.wait_for(CancelOnDisconnect(app)(_scope(True), server.receive, server.send), 5)
    assert finished == [True]


async def test_a_cancel_from_outside_still_propagates() -> None:
    from modelyard.api.disconnect import CancelOnDisconnect

    server = ScriptedServer({"type": "http.request", "body": b"", "more_body": False})
    started = asyncio.Event()

    async def app(scope: object, receive: object, send: object) -> None:
        started.set()
        await asyncio.Event().wait()

    call = asyncio.ensure_future(CancelOnDisconnect(app)(_scope(False), server.receive, server.send))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()
    try:
        await call
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("an outside cancel was swallowed")
    assert call.cancelled()
