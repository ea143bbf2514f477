"""The one ASGI layer around the whole app: what every HTTP exchange needs on its way in and out.

Four jobs share one layer because each ASGI layer costs a coroutine, two wrapper closures
and a call per message on every request.

- **Telemetry**: one request id (kept from ``X-Request-Id`` when sane, returned on the
  response), one request span, one access line and the HTTP metrics. The
  :class:`~modelyard.core.logs.RequestInfo` it binds is shared with the handler's task, so
  the core can fill in model, version, tokens and cache result.
- **Body stall timer**: a body that stalls for ``body_timeout_s`` gets 408. uvicorn's only
  slow-client timer is ``timeout_keep_alive`` (idle connections between requests); a client
  trickling a body would otherwise hold a handler forever.
- **Connection: close** on a response sent while the body is unread (413, 401 before
  reading, 408): the connection cannot carry another request, and closing it at once beats
  the client sending into it until the keep-alive timer fires.
- **Cancel on disconnect**: ASGI servers do not cancel an application whose client went
  away; without this a request waiting in a batch queue would still run after nobody can
  read the answer. Once the body is read (at once for a request without one; the
  application then gets an empty body message), one watcher task owns ``receive``: the next
  message a server sends is the disconnect, and unless the response has ended by then the
  watcher cancels the task running the application. A later ``receive`` by the application
  (a streaming response listening for the disconnect) waits for the watcher.

Response hooks (the RateLimit fields and the admin audit of :class:`Security`) run on the
response start. The layer wraps Litestar's ``asgi_handler`` rather than sitting in the
middleware list: app middleware runs only for requests that match a route, and a 404 or 405
must still get an X-Request-Id, an access line and the body rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from litestar.exceptions import HTTPException
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from modelyard.api.observability import CLIENT_CLOSED, end_request_span, record_request
from modelyard.core.logs import RequestInfo, bind_request, release_request, sane_request_id

if TYPE_CHECKING:
    from modelyard.core.telemetry import Telemetry
    from modelyard.core.tracing import RawHeaders

__all__ = ["Exchange", "ResponseHook"]

#: Called with the scope and the ``http.response.start`` message; may change its headers.
ResponseHook = Callable[[Scope, Message], None]

_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}
_EMPTY_BODY: dict[str, Any] = {"type": "http.request", "body": b"", "more_body": False}
_CLOSE = (b"connection", b"close")
#: Statuses that leave the body unread by design, whatever ``pending`` says.
_CLOSING_STATUSES = frozenset({408, 413})


class Exchange:
    """ASGI layer: request telemetry, body timer, ``Connection: close``, cancel on disconnect."""

    def __init__(
        self,
        app: ASGIApp,
        telemetry: Telemetry,
        *,
        body_timeout_s: float = 30.0,
        response_hooks: Sequence[ResponseHook] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        self.body_timeout_s = body_timeout_s
        self.response_hooks = tuple(response_hooks)
        self.clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        # A list in every ASGI server (the spec types it as an iterable); read more than once.
        headers = cast("RawHeaders", scope["headers"])
        incoming_id, has_traceparent, has_body = None, False, False
        for name, value in headers:
            if name == b"x-request-id":
                incoming_id = value.decode("latin-1")
            elif name == b"traceparent":
                has_traceparent = True
            elif name == b"transfer-encoding" or (
                name == b"content-length" and value.strip() != b"0"
            ):
                has_body = True
        method, path = scope["method"], scope["path"]  # type: ignore[typeddict-item]
        info = RequestInfo(sane_request_id(incoming_id), method=method, path=path)
        request_token = bind_request(info)
        telemetry = self.telemetry
        span, span_token = telemetry.tracing.start_request(
            method, path, headers, has_traceparent=has_traceparent
        )
        id_header = (b"x-request-id", info.request_id.encode("latin-1"))
        task = asyncio.current_task()
        assert task is not None
        watch = _Watch(receive, task, pending=has_body)
        timeout_s, hooks = self.body_timeout_s, self.response_hooks
        status = 0
        started = self.clock()

        async def app_receive() -> Any:
            if watch.body_read:
                await watch.gone.wait()
                return _DISCONNECT
            if watch.watcher is not None:  # no body: the watcher took the empty message
                watch.body_read = True
                return _EMPTY_BODY.copy()
            try:
                async with asyncio.timeout(timeout_s):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(
                    status_code=408, detail=f"request body stalled for {timeout_s:g}s"
                ) from None
            if message["type"] == "http.disconnect":
                watch.pending = False
                watch.gone.set()
            elif not message.get("more_body", False):
                watch.pending = False
                watch.body_read = True
                watch.start()
            return message

        async def app_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                extra = [id_header]
                if watch.pending or status in _CLOSING_STATUSES:
                    extra.append(_CLOSE)
                message["headers"] = [*message.get("headers", ()), *extra]
                for hook in hooks:
                    hook(scope, message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                watch.complete = True  # what follows is the end of the exchange, not a loss
            await send(message)

        if not has_body:
            watch.start()
        try:
            await self.app(scope, app_receive, app_send)
        except asyncio.CancelledError:
            # Our own cancel ends the request quietly; anyone else's goes on up.
            if not watch.cancelled or task.uncancel() > 0:
                status = status or 500
                raise
        except BaseException:
            status = status or 500
            raise
        finally:
            await watch.close()
            seconds = self.clock() - started
            route = scope.get("path_template")  # set by the router once it matched
            record_request(telemetry, info, status or CLIENT_CLOSED, seconds, route, scope)
            end_request_span(telemetry, span, span_token, info, status or CLIENT_CLOSED, route)
            release_request(request_token)


class _Watch:
    """One request's disconnect state: the watcher, whether the client left, whether the
    answer ended, whether body bytes are still unread."""

    __slots__ = ("body_read", "cancelled", "complete", "gone", "handler", "pending",
                 "receive", "watcher")

    def __init__(self, receive: Receive, handler: asyncio.Task[Any], *, pending: bool) -> None:
        self.receive = receive
        self.handler = handler
        self.gone = asyncio.Event()
        self.pending = pending
        self.complete = False
        self.cancelled = False
        self.body_read = False
        self.watcher: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        self.gone.set()
        if not self.complete:
            self.cancelled = True
            self.handler.cancel()

    async def close(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
