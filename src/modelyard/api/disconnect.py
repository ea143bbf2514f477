"""Cancel a request's handler when its client goes away, so queued work is never executed."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from litestar.types import ASGIApp, Receive, Scope, Send

__all__ = ["CancelOnDisconnect"]


class CancelOnDisconnect:
    """ASGI middleware: a client disconnect before the response ends cancels the handler.

    ASGI servers do not cancel an application when its client disconnects; without this a
    request waiting in a batch queue would still run after nobody can read the answer. One
    watcher task owns ``receive``; body messages pass through a one-slot queue so the body is
    never read ahead of the application (the body-size limit still applies as it streams).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        body: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1)
        gone = asyncio.Event()
        body_pending = True

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    return
                await body.put(dict(message))

        async def app_receive() -> dict[str, Any]:
            nonlocal body_pending
            if body_pending:
                getter = asyncio.ensure_future(body.get())
                waiter = asyncio.ensure_future(gone.wait())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                if getter in done:
                    message = getter.result()
                    body_pending = bool(message.get("more_body", False))
                    return message
                getter.cancel()
            await gone.wait()
            return {"type": "http.disconnect"}

        watcher = asyncio.ensure_future(watch())
        handler = asyncio.ensure_future(self.app(scope, app_receive, send))  # type: ignore[arg-type]
        try:
            waiter = asyncio.ensure_future(gone.wait())
            await asyncio.wait({handler, waiter}, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if not handler.done():
                handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
