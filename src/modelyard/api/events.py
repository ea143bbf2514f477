"""WebSockets: live server events (``/v1/events``) and a chat stream (``/v1/chat/completions/ws``).

Litestar runs ``before_request`` for HTTP handlers only, so each handler here authenticates
itself through the app's :class:`~modelyard.api.security.Security` (``authenticate_socket``):
the ``Authorization`` header, or a ``token`` in the client's first message. Close codes and
message shapes are documented in docs/events.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, Literal, TypeVar

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from modelyard.api.openai import _SSE, ChatCompletionBody, _usage, chat_request
from modelyard.api.problems import client_detail
from modelyard.api.security import Permission, Security
from modelyard.core.auth import Principal
from modelyard.core.errors import (
    BadRequestError,
    ForbiddenError,
    ModelyardError,
    UnauthorizedError,
)
from modelyard.core.events import (
    EVENT_KINDS,
    BatchCompleted,
    BatchProgress,
    Event,
    EventBus,
    Subscription,
    kind_of,
)
from modelyard.core.service import InferenceService
from modelyard.core.types import StreamChunk

__all__ = [
    "CLOSE_FIRST_MESSAGE_TIMEOUT",
    "CLOSE_POLICY",
    "CLOSE_SLOW_CONSUMER",
    "chat_socket",
    "events_socket",
]

log = logging.getLogger(__name__)

#: Refused: no, a bad, or an insufficient credential (RFC 6455 "policy violation").
CLOSE_POLICY = 1008
#: The subscriber fell a whole buffer behind and was dropped; resynchronise and reconnect.
CLOSE_SLOW_CONSUMER = 4008
#: The first message (credentials, subscription or request) did not come in time.
CLOSE_FIRST_MESSAGE_TIMEOUT = 4408
#: Seconds a client without an ``Authorization`` header has to send its first message.
FIRST_MESSAGE_TIMEOUT_S = 10.0


class Subscribe(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A client's subscribe message: credentials (first message only) and its filter."""

    type: Literal["subscribe"]
    token: str | None = None
    kinds: list[str] | None = None
    models: list[str] | None = None


class Auth(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The chat socket's optional first message: a bearer token."""

    type: Literal["auth"]
    token: str


class _Filter:
    """What one subscriber asked for (kinds, models; None = all) within what it may see."""

    def __init__(self, principal: Principal) -> None:
        self.principal = principal
        self.kinds: frozenset[str] | None = None
        self.models: frozenset[str] | None = None

    def set(self, kinds: list[str] | None, models: list[str] | None) -> None:
        unknown = sorted(set(kinds or ()) - EVENT_KINDS)
        if unknown:
            raise BadRequestError(
                f"unknown event kind {unknown[0]!r}; known: {', '.join(sorted(EVENT_KINDS))}"
            )
        self.kinds = frozenset(kinds) if kinds else None
        self.models = frozenset(models) if models else None

    def __call__(self, event: Event) -> bool:
        if self.kinds is not None and kind_of(event) not in self.kinds:
            return False
        if self.models is not None and event.model not in self.models:
            return False
        return visible(self.principal, event)

    def ack(self) -> bytes:
        return msgspec.json.encode({
            "type": "subscribed",
            "kinds": sorted(self.kinds) if self.kinds is not None else None,
            "models": sorted(self.models) if self.models is not None else None,
        })


def visible(principal: Principal, event: Event) -> bool:
    """RBAC: a model's events within the principal's model scopes; a batch's to its owner
    (and admins)."""
    if isinstance(event, BatchProgress | BatchCompleted):
        return event.owner == principal.id or "admin" in principal.roles
    return not event.model or principal.may_use(event.model)


def _split(values: list[str]) -> list[str]:
    return [part for value in values for part in value.split(",") if part]


def _error(exc: ModelyardError) -> bytes:
    message = client_detail(exc.status_code, exc.type_slug, exc.detail)
    return msgspec.json.encode(
        {"type": "error", "error": {"message": message, "type": exc.type_slug,
                                    "code": exc.status_code}}
    )


def _close_code(exc: ModelyardError) -> int:
    """1008 for a refused credential or permission, else 4000 + the HTTP status."""
    if isinstance(exc, UnauthorizedError | ForbiddenError):
        return CLOSE_POLICY
    return 4000 + exc.status_code if exc.status_code < 1000 else 1011


async def _refuse(socket: WebSocket[Any, Any, Any], exc: ModelyardError) -> None:
    """Send the error (when accepted) and close with its code."""
    with contextlib.suppress(Exception):  # the client may be gone already
        if socket.connection_state == "init":  # not accepted: refused at the handshake
            await socket.close(code=_close_code(exc), reason=exc.type_slug[:100])
            return
        await socket.send_text(_error(exc).decode())
        await socket.close(code=_close_code(exc), reason=exc.type_slug[:100])


async def _first_text(socket: WebSocket[Any, Any, Any]) -> str | None:
    """The client's first message, or None when it does not come in time (socket closed)."""
    try:
        return await asyncio.wait_for(socket.receive_text(), FIRST_MESSAGE_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await socket.close(code=CLOSE_FIRST_MESSAGE_TIMEOUT, reason="first message timeout")
        return None


def _decode(text: str, kind: type[msgspec.Struct]) -> Any:
    try:
        return msgspec.json.decode(text, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequestError(f"malformed message: {exc}") from None


_First = TypeVar("_First", Subscribe, Auth)


async def _accept(
    socket: WebSocket[Any, Any, Any], security: Security, permission: Permission,
    first_type: type[_First],
) -> tuple[Principal, _First | None] | None:
    """Authenticate from the ``Authorization`` header before accepting, or accept and take
    the token from the client's first message (returned too); None when the client left."""
    if socket.headers.get("authorization") or not security.enabled:
        principal = await security.authenticate_socket(socket, permission)
        await socket.accept()
        return principal, None
    await socket.accept()
    text = await _first_text(socket)
    if text is None:
        return None
    first = _decode(text, first_type)
    return await security.authenticate_socket(socket, permission, token=first.token), first


# -- /v1/events --------------------------------------------------------------------------


@websocket("/v1/events")
async def events_socket(socket: WebSocket[Any, Any, Any]) -> None:
    """Stream typed server events as JSON text messages, filtered by kind and model.

    Query ``kinds`` and ``models`` (comma-separated or repeated) set the filter; a
    ``{"type": "subscribe", ...}`` message replaces it (and, as the first message, carries
    the ``token`` of a client that sent no ``Authorization`` header).
    """
    security: Security = socket.app.state["security"]
    service: InferenceService = socket.app.state["service"]
    try:
        accepted = await _accept(socket, security, Permission.READ, Subscribe)
        if accepted is None:
            return
        principal, first = accepted
        wanted = _Filter(principal)
        if first is not None:
            wanted.set(first.kinds, first.models)
        else:
            query = socket.query_params
            wanted.set(_split(query.getall("kinds", [])) or None,
                       _split(query.getall("models", [])) or None)
    except ModelyardError as exc:
        await _refuse(socket, exc)
        return
    bus: EventBus = service.events
    sub = bus.subscribe(wanted)
    try:
        await socket.send_text(wanted.ack().decode())
        await _serve(socket, sub, wanted)
    except WebSocketDisconnect:
        pass
    finally:
        sub.close()


async def _serve(socket: WebSocket[Any, Any, Any], sub: Subscription, wanted: _Filter) -> None:
    pump = _task(_pump(socket, sub))
    reader = _task(_read_subscribes(socket, wanted))
    closed = _task(sub.wait_closed())
    try:
        await asyncio.wait({pump, reader, closed}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, reader, closed):
            task.cancel()
        await asyncio.gather(pump, reader, closed, return_exceptions=True)
    if reader.done() and not reader.cancelled() and reader.exception() is not None:
        return  # the client went away
    with contextlib.suppress(Exception):
        if sub.dropped:
            log.warning("events subscriber %s dropped: a full buffer behind", socket.client)
            await socket.close(code=CLOSE_SLOW_CONSUMER, reason="slow consumer")
        elif sub.closed:
            await socket.close(code=1001, reason="server shutting down")


def _task(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(coro)


async def _pump(socket: WebSocket[Any, Any, Any], sub: Subscription) -> None:
    while (event := await sub.next()) is not None:
        await socket.send_text(msgspec.json.encode(event).decode())


async def _read_subscribes(socket: WebSocket[Any, Any, Any], wanted: _Filter) -> None:
    """Apply later subscribe messages; a malformed one gets an error message, not a close."""
    while True:
        text = await socket.receive_text()  # WebSocketDisconnect ends the session
        try:
            message: Subscribe = _decode(text, Subscribe)
            wanted.set(message.kinds, message.models)
        except BadRequestError as exc:
            await socket.send_text(_error(exc).decode())
            continue
        await socket.send_text(wanted.ack().decode())


# -- /v1/chat/completions/ws ---------------------------------------------------------------


@websocket("/v1/chat/completions/ws")
async def chat_socket(socket: WebSocket[Any, Any, Any]) -> None:
    """One chat completion per socket: the ``/v1/chat/completions`` body in, token chunks
    out, then a final chunk with ``finish_reason`` and ``usage``; closing the socket cancels
    the generation and frees its slot."""
    security: Security = socket.app.state["security"]
    service: InferenceService = socket.app.state["service"]
    try:
        accepted = await _accept(socket, security, Permission.INFER, Auth)
        if accepted is None:
            return
        principal, _ = accepted
        text = await _first_text(socket)
        if text is None:
            return
        body: ChatCompletionBody = _decode(text, ChatCompletionBody)
        if not principal.may_use(body.model):
            raise ForbiddenError(f"not allowed to use model {body.model!r}")
        chunks = await _start_chat(service, body)
    except WebSocketDisconnect:
        return
    except ModelyardError as exc:
        await _refuse(socket, exc)
        return
    await _relay(socket, chunks)


async def _start_chat(service: InferenceService, body: ChatCompletionBody) -> _Stream:
    started = await service.stream(body.model, chat_request(body))
    return _Stream(_SSE("chat", started.version.name, include_usage=True), started.chunks)


class _Stream:
    def __init__(self, sse: _SSE, chunks: AsyncIterator[StreamChunk]) -> None:
        self.sse = sse
        self.chunks = chunks

    def message(self, chunk: StreamChunk, first: bool) -> str:
        payload: dict[str, Any] = {
            "id": self.sse.id, "object": "chat.completion.chunk", "created": self.sse.created,
            "model": self.sse.model, "choices": [self.sse._choice(chunk, first)],
        }
        if chunk.finish_reason is not None:
            payload["usage"] = _usage(chunk.prompt_tokens or 0, chunk.completion_tokens or 0)
        return msgspec.json.encode(payload).decode()

    async def aclose(self) -> None:
        close = getattr(self.chunks, "aclose", None)
        if close is not None:
            await close()


async def _relay(socket: WebSocket[Any, Any, Any], stream: _Stream) -> None:
    """Send chunks until the end; a client that closes (or sends anything) cancels it."""
    generate = _task(_generate(socket, stream))
    watch = _task(_until_client_leaves(socket))
    try:
        await asyncio.wait({generate, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (generate, watch):
            task.cancel()
        await asyncio.gather(generate, watch, return_exceptions=True)
        await stream.aclose()  # stops the backend's generation and frees the version's slot
    if generate.done() and not generate.cancelled() and generate.exception() is None:
        with contextlib.suppress(Exception):
            await socket.close(code=1000)


async def _generate(socket: WebSocket[Any, Any, Any], stream: _Stream) -> None:
    first = True
    try:
        async for chunk in stream.chunks:
            if chunk.text or chunk.finish_reason is not None or first:
                await socket.send_text(stream.message(chunk, first))
                first = False
    except ModelyardError as exc:
        await socket.send_text(_error(exc).decode())
    except (asyncio.CancelledError, WebSocketDisconnect):
        raise
    except Exception:  # an accepted stream reports failures in-band, like SSE
        log.exception("websocket chat stream of %s failed", stream.sse.model)
        await socket.send_text(_error(ModelyardError("backend failed mid-stream")).decode())


async def _until_client_leaves(socket: WebSocket[Any, Any, Any]) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        await socket.receive_data(mode="text")
