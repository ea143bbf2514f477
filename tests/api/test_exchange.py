"""The app's one ASGI layer alone, against a scripted server: cancel on disconnect, the
headers it adds, its response hooks and its 499/500 bookkeeping."""

from __future__ import annotations

import asyncio
from typing import Any

from modelyard.api.exchange import Exchange
from modelyard.core.metrics import Metrics
from modelyard.core.telemetry import Telemetry


def _layer(app: object, **options: Any) -> Exchange:
    return Exchange(app, Telemetry(metrics=Metrics(process=False)), **options)  # type: ignore[arg-type]


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
    server = ScriptedServer({"type": "http.request", "body": b"", "more_body": False})
    seen = []

    async def app(scope: object, receive: object, send: object) -> None:
        seen.append(await receive())  # type: ignore[operator]
        await _respond(send)

    await asyncio.wait_for(_layer(app)(_scope(False), server.receive, server.send), 5)
    assert seen == [{"type": "http.request", "body": b"", "more_body": False}]
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]


async def test_a_disconnect_after_the_body_cancels_the_waiting_handler() -> None:
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

    call = asyncio.ensure_future(_layer(app)(_scope(True), server.receive, server.send))
    await asyncio.wait_for(waiting.wait(), 5)
    server.disconnect()
    await asyncio.wait_for(call, 5)  # returns quietly: the cancel was the middleware's own
    assert bytes(body) == b"abcd" and stopped == ["cancelled"] and server.sent == []


async def test_work_after_the_response_ends_is_not_cancelled_by_the_closing_disconnect() -> None:
    server = ScriptedServer({"type": "http.request", "body": b"abcd", "more_body": False})
    finished = []

    async def app(scope: object, receive: object, send: object) -> None:
        await receive()  # type: ignore[operator]
        await _respond(send)
        server.disconnect()  # what uvicorn's receive says once the response is complete
        for _ in range(20):
            await asyncio.sleep(0)
        finished.append(True)  # e.g. metrics and access lines written after the response

    await asyncio.wait_for(_layer(app)(_scope(True), server.receive, server.send), 5)
    assert finished == [True]


async def test_a_cancel_from_outside_still_propagates() -> None:
    server = ScriptedServer({"type": "http.request", "body": b"", "more_body": False})
    started = asyncio.Event()

    async def app(scope: object, receive: object, send: object) -> None:
        started.set()
        await asyncio.Event().wait()

    call = asyncio.ensure_future(_layer(app)(_scope(False), server.receive, server.send))
    await asyncio.wait_for(started.wait(), 5)
    call.cancel()
    try:
        await call
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("an outside cancel was swallowed")
    assert call.cancelled()


def _headers(message: dict[str, Any]) -> dict[bytes, bytes]:
    return dict(message["headers"])


async def test_a_response_before_the_body_is_read_closes_the_connection() -> None:
    server = ScriptedServer({"type": "http.request", "body": b"abcd", "more_body": False})

    async def refuse(scope: object, receive: object, send: object) -> None:
        await _respond(send)  # e.g. 401 before reading: the body is still on the wire

    await asyncio.wait_for(_layer(refuse)(_scope(True), server.receive, server.send), 5)
    start = _headers(server.sent[0])
    assert start[b"connection"] == b"close"
    assert len(start[b"x-request-id"]) == 32


async def test_a_response_after_the_body_keeps_the_connection() -> None:
    server = ScriptedServer({"type": "http.request", "body": b"abcd", "more_body": False})

    async def read_then_answer(scope: object, receive: object, send: object) -> None:
        await receive()  # type: ignore[operator]
        await _respond(send)

    await asyncio.wait_for(_layer(read_then_answer)(_scope(True), server.receive, server.send), 5)
    assert b"connection" not in _headers(server.sent[0])


async def test_response_hooks_see_the_start_with_the_layers_headers() -> None:
    server = ScriptedServer()
    seen: list[tuple[str, int, dict[bytes, bytes]]] = []

    def hook(scope: Any, message: Any) -> None:
        seen.append((scope["path"], message["status"], _headers(message)))
        message["headers"].append((b"ratelimit", b"x"))

    async def answer(scope: object, receive: object, send: object) -> None:
        await _respond(send)

    await asyncio.wait_for(
        _layer(answer, response_hooks=[hook])(_scope(False), server.receive, server.send), 5
    )
    [(path, status, headers)] = seen
    assert (path, status) == ("/", 200) and b"x-request-id" in headers
    assert _headers(server.sent[0])[b"ratelimit"] == b"x"
    assert [m["type"] for m in server.sent] == ["http.response.start", "http.response.body"]


async def test_a_stalled_body_raises_408_inside_the_app() -> None:
    server = ScriptedServer({"type": "http.request", "body": b"ab", "more_body": True})
    raised: list[int] = []

    async def read_all(scope: object, receive: object, send: object) -> None:
        from litestar.exceptions import HTTPException

        try:
            while (await receive())["more_body"]:  # type: ignore[operator]
                pass
        except HTTPException as exc:  # what Litestar turns into the 408 problem
            raised.append(exc.status_code)
            await send({"type": "http.response.start", "status": 408, "headers": []})  # type: ignore[operator]
            await send({"type": "http.response.body", "body": b""})  # type: ignore[operator]

    # The second body message never comes (the scripted client went quiet, not away).
    await asyncio.wait_for(
        _layer(read_all, body_timeout_s=0.05)(_scope(True), server.receive, server.send), 5
    )
    assert raised == [408]
    assert _headers(server.sent[0])[b"connection"] == b"close"


async def test_the_request_metric_says_499_for_a_client_that_left_and_500_for_a_crash() -> None:
    telemetry = Telemetry(metrics=Metrics(process=False))

    async def wait_forever(scope: object, receive: object, send: object) -> None:
        await receive()  # type: ignore[operator]
        await asyncio.Event().wait()

    async def crash(scope: object, receive: object, send: object) -> None:
        raise RuntimeError("boom")

    gone = ScriptedServer()
    call = asyncio.ensure_future(Exchange(wait_forever, telemetry)(  # type: ignore[arg-type]
        _scope(False), gone.receive, gone.send))
    for _ in range(5):
        await asyncio.sleep(0)
    gone.disconnect()
    await asyncio.wait_for(call, 5)
    broken = ScriptedServer()
    try:
        await Exchange(crash, telemetry)(_scope(False), broken.receive, broken.send)  # type: ignore[arg-type]
    except RuntimeError:
        pass
    else:
        raise AssertionError("the crash was swallowed")
    exposition = telemetry.metrics.exposition(None)[0].decode()
    assert 'status="499"' in exposition and 'status="500"' in exposition
