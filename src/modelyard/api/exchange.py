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

**Drain**: once :meth:`Exchange.begin_drain` is called (the server got SIGTERM) every
response carries ``Connection: close``, so each connection still open answers one more
request (a readiness probe sees 503) and closes. When the grace period is over,
:meth:`Exchange.abort_in_flight` ends every request still running: it cancels the handler
and answers 503 problem+json with ``Retry-After`` itself, instead of the server cancelling
the application and answering a bare 500 with a traceback in the log.

**CORS preflights** (when ``[cors]`` is on) are answered here, before routing and before the
security check: a preflight carries no credentials by design.

Response hooks (the RateLimit fields and the admin audit of :class:`Security`, the CORS
fields) run on the response start. The layer wraps Litestar's ``asgi_handler`` rather than
sitting in the middleware list: app middleware runs only for requests that match a route, and
a 404 or 405 must still get an X-Request-Id, an access line and the body rules.
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
from modelyard.api.problems import PROBLEM_JSON, problem_body
from modelyard.core.logs import RequestInfo, bind_request, release_request, sane_request_id

if TYPE_CHECKING:
    from modelyard.core.telemetry import Telemetry
    from modelyard.core.tracing import RawHeaders

__all__ = ["Exchange", "Preflight", "ResponseHook"]

#: Called with the scope and the ``http.response.start`` message; may change its headers.
ResponseHook = Callable[[Scope, Message], None]
#: Given an OPTIONS request's headers: the app answering its CORS preflight, or None.
Preflight = Callable[["RawHeaders"], ASGIApp | None]

_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}
_EMPTY_BODY: dict[str, Any] = {"type": "http.request", "body": b"", "more_body": False}
_CLOSE = (b"connection", b"close")
#: Statuses that leave the body unread by design, whatever ``pending`` says.
_CLOSING_STATUSES = frozenset({408, 413})
#: What a request still running when the drain's grace period ends is told.
_SHUTTING_DOWN = "the server is shutting down; retry the request (another instance may answer)"
_SHUTDOWN_RETRY_AFTER_S = 1


class Exchange:
    """ASGI layer: request telemetry, body timer, ``Connection: close``, cancel on disconnect,
    the drain, CORS preflights."""

    def __init__(
        self,
        app: ASGIApp,
        telemetry: Telemetry,
        *,
        body_timeout_s: float = 30.0,
        response_hooks: Sequence[ResponseHook] = (),
        preflight: Preflight | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.telemetry = telemetry
        self.body_timeout_s = body_timeout_s
        self.response_hooks = tuple(response_hooks)
        self.preflight = preflight
        self.clock = clock
        #: Set by :meth:`begin_drain`: every response from then on closes its connection.
        self.draining = False
        self._in_flight: set[_Watch] = set()

    @property
    def in_flight(self) -> int:
        """HTTP requests the application is still working on."""
        return len(self._in_flight)

    def begin_drain(self) -> None:
        """The server is going away: every response from now on closes its connection."""
        self.draining = True

    def abort_in_flight(self) -> int:
        """End every request still in flight with 503 + ``Retry-After``; how many there were.

        Call on the event loop once the drain's grace period is over. A response already
        started (a stream) is ended where it is; one not started yet gets the problem body.
        """
        return sum(watch.abort() for watch in list(self._in_flight))

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
        app = self.app
        if method == "OPTIONS" and self.preflight is not None:
            app = self.preflight(headers) or app
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
                if watch.pending or status in _CLOSING_STATUSES or self.draining:
                    extra.append(_CLOSE)
                message["headers"] = [*message.get("headers", ()), *extra]
                for hook in hooks:
                    hook(scope, message)
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                watch.complete = True  # what follows is the end of the exchange, not a loss
            await send(message)

        if not has_body:
            watch.start()
        self._in_flight.add(watch)
        try:
            await app(scope, app_receive, app_send)
        except asyncio.CancelledError:
            # Our own cancel ends the request quietly; anyone else's goes on up.
            if not (watch.cancelled or watch.aborted) or task.uncancel() > 0:
                status = status or 500
                raise
            if watch.aborted and not watch.gone.is_set():
                await _answer_aborted(scope, app_send, started=status != 0)
        except BaseException:
            status = status or 500
            raise
        finally:
            self._in_flight.discard(watch)
            await watch.close()
            seconds = self.clock() - started
            route = scope.get("path_template")  # set by the router once it matched
            record_request(telemetry, info, status or CLIENT_CLOSED, seconds, route, scope)
            end_request_span(telemetry, span, span_token, info, status or CLIENT_CLOSED, route)
            release_request(request_token)


async def _answer_aborted(scope: Scope, send: Send, *, started: bool) -> None:
    """Tell a request cut off by the end of the drain: 503 problem+json, or end its stream."""
    if started:  # a stream is under way: end it where it is (the connection closes after)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    body, headers = problem_body(
        scope["path"], status=503, title="Service Unavailable", detail=_SHUTTING_DOWN,
        type_slug="shutting-down",
    )
    headers["Retry-After"] = str(_SHUTDOWN_RETRY_AFTER_S)
    raw = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": 503, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _Watch:
    """One request's disconnect state: the watcher, whether the client left, whether the
    answer ended, whether body bytes are still unread, whether the drain cut it off."""

    __slots__ = ("aborted", "body_read", "cancelled", "complete", "gone", "handler",
                 "pending", "receive", "watcher")

    def __init__(self, receive: Receive, handler: asyncio.Task[Any], *, pending: bool) -> None:
        self.receive = receive
        self.handler = handler
        self.gone = asyncio.Event()
        self.pending = pending
        self.complete = False
        self.cancelled = False
        self.aborted = False
        self.body_read = False
        self.watcher: asyncio.Task[None] | None = None

    def abort(self) -> bool:
        """Cancel the handler (once) unless its answer ended or its client left already."""
        if self.complete or self.cancelled or self.aborted:
            return False
        self.aborted = True
        self.handler.cancel()
        return True

    def start(self) -> None:
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
        self.gone.set()
        if not (self.complete or self.aborted):
            self.cancelled = True
            self.handler.cancel()

    async def close(self) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
