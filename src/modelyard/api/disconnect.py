"""Cancel a request's handler when its client goes away, so queued work is never executed."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CancelOnDisconnect"]

_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}


class CancelOnDisconnect:
    """ASGI middleware: a client disconnect before the response ends cancels the handler.

    ASGI servers do not cancel an application when its client disconnects; without this a
    request waiting in a batch queue would still run after nobody can read the answer.

    The application reads its body straight from the server (a disconnect meanwhile comes back
    as ``http.disconnect``, as usual). Once the body is read (at once for a request without
    one; the application then gets an empty body message), one watcher task owns ``receive``:
    the next message a server sends is the disconnect, and unless the response has ended by
    then the watcher cancels the task running the application. A later ``receive`` by the
    application (a streaming response listening for the disconnect) waits for the watcher.
    The handler keeps running in the server's task: no task per request beyond the watcher.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        request = _Request(receive)
        task = asyncio.current_task()
        assert task is not None

        async def app_receive() -> Any:
            if request.body_read:
                await request.gone.wait()
                return _DISCONNECT
            if request.watcher is not None:  # no body: the watcher took the empty message
                request.body_read = True
                return {"type": "http.request", "body": b"", "more_body": False}
            message = await receive()
            if message["type"] == "http.disconnect":
                request.gone.set()
            elif not message.get("more_body", False):
                request.body_read = True
                request.watch(task)
            return message

        async def app_send(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                request.complete = True  # what follows is the end of the exchange, not a loss
            await send(message)

        if not _has_body(scope):
            request.watch(task)
        try:
            await self.app(scope, app_receive, app_send)
        except asyncio.CancelledError:
            # Our own cancel ends the request quietly; anyone else's goes on up.
            if not request.cancelled or task.uncancel() > 0:
                raise
        finally:
            await request.close()


class _Request:
    """The per-request state: the watcher, whether the client left, whether the answer ended."""

    __slots__ = ("body_read", "cancelled", "complete", "gone", "receive", "watcher")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.gone = asyncio.Event()
        self.complete = False
        self.cancelled = False
        self.body_read = False
        self.watcher: asyncio.Task[None] | None = None

    def watch(self, handler: asyncio.Task[Any]) -> None:
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch(handler))

    async def _watch(self, handler: asyncio.Task[Any]) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        self.gone.set()
        if not self.complete:
            self.cancelled = True
            handler.cancel()

    async def close(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


def _has_body(scope: Scope) -> bool:
    for name, value in scope.get("headers", []):
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False
