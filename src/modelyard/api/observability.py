"""HTTP side of observability: request ids, the request span, access lines, ``GET /metrics``."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, cast

from litestar import Controller, Request, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from modelyard.core.logs import (
    ACCESS_LOGGER,
    RequestInfo,
    bind_request,
    release_request,
    sane_request_id,
)
from modelyard.core.service import InferenceService

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from modelyard.core.telemetry import Telemetry
    from modelyard.core.tracing import RawHeaders

__all__ = ["MetricsController", "RequestTelemetry"]

#: Status recorded when the client went away before any response started (nginx's 499).
CLIENT_CLOSED = 499
#: Routes polled by machines: their access lines are DEBUG, not INFO.
QUIET_ROUTES = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})
UNMATCHED_ROUTE = "unmatched"

access_log = logging.getLogger(ACCESS_LOGGER)


class RequestTelemetry:
    """ASGI wrapper around the whole app (routed or not): one id, span and access line each.

    It wraps Litestar's ``asgi_handler`` rather than sitting in the middleware list, because
    app middleware only runs for requests that match a route: a 404 or 405 must still get an
    X-Request-Id and an access line. The :class:`RequestInfo` it binds is shared with the
    handler's task, so the core can fill in model, version, tokens and cache result.
    """

    def __init__(self, app: ASGIApp, telemetry: Telemetry) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # type: ignore[comparison-overlap]
            await self.app(scope, receive, send)
            return
        # A list in every ASGI server (the spec types it as an iterable); read more than once.
        headers = cast("RawHeaders", scope["headers"])
        incoming_id, has_traceparent = None, False
        for name, value in headers:
            if name == b"x-request-id":
                incoming_id = value.decode("latin-1")
            elif name == b"traceparent":
                has_traceparent = True
        method, path = scope["method"], scope["path"]  # type: ignore[typeddict-item]
        info = RequestInfo(sane_request_id(incoming_id), method=method, path=path)
        request_token = bind_request(info)
        span, span_token = self.telemetry.tracing.start_request(
            method, path, headers, has_traceparent=has_traceparent
        )
        id_header = (b"x-request-id", info.request_id.encode("latin-1"))
        status = 0
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            status = status or 500
            raise
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("path_template")  # set by the router once it matched
            self._finish(info, status or CLIENT_CLOSED, seconds, route, scope)
            self._end_span(span, span_token, info, status or CLIENT_CLOSED, route)
            release_request(request_token)

    def _finish(
        self, info: RequestInfo, status: int, seconds: float, route: str | None, scope: Scope
    ) -> None:
        metrics = self.telemetry.metrics
        metrics.http_request(info.method, route or UNMATCHED_ROUTE, status)
        if info.model:
            metrics.version(info.model, info.version, info.backend).request(status, seconds)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        if access_log.isEnabledFor(level):
            client = scope.get("client")
            access_log.log(
                level, "%s %s %d %.1fms", info.method, info.path, status, seconds * 1000.0,
                extra=_access_fields(info, status, seconds, route, client[0] if client else ""),
            )

    def _end_span(
        self, span: Span, token: object | None, info: RequestInfo, status: int, route: str | None
    ) -> None:
        if not span.is_recording():
            self.telemetry.tracing.end_request(span, token, method=info.method, status=status,
                                               route=route, attributes={})
            return
        attributes: dict[str, Any] = {
            "modelyard.request_id": info.request_id,
            "modelyard.model": info.model, "modelyard.version": info.version,
            "modelyard.backend": info.backend, "modelyard.cache.result": info.cache,
            "gen_ai.usage.input_tokens": info.prompt_tokens,
            "gen_ai.usage.output_tokens": info.completion_tokens,
        }
        self.telemetry.tracing.end_request(
            span, token, method=info.method, status=status, route=route,
            attributes={k: v for k, v in attributes.items() if v is not None and v != ""},
        )


def _access_fields(
    info: RequestInfo, status: int, seconds: float, route: str | None, client: str
) -> dict[str, Any]:
    # Only what is listed here reaches the line: never headers, the query string or bodies.
    fields: dict[str, Any] = {
        "request_id": info.request_id, "method": info.method, "path": info.path,
        "route": route, "status": status, "duration_ms": round(seconds * 1000.0, 3),
        "client": client,
    }
    if info.model:
        fields.update(model=info.model, version=info.version, backend=info.backend)
    if info.prompt_tokens is not None:
        fields["prompt_tokens"] = info.prompt_tokens
    if info.completion_tokens is not None:
        fields["completion_tokens"] = info.completion_tokens
    if info.cache:
        fields["cache"] = info.cache
    if info.prompt is not None:
        fields["prompt"] = info.prompt
    return fields


class MetricsController(Controller):
    path = "/metrics"
    tags = ("Observability",)

    @get("")
    async def metrics(
        self, request: Request[Any, Any, Any], service: InferenceService
    ) -> Response[bytes]:
        """Prometheus metrics (text format, or OpenMetrics when the scraper asks for it)."""
        # Collected on the event loop on purpose: breakers and queues are loop-owned state.
        if service.cache is not None:
            service.telemetry.metrics.sync_cache(service.cache.stats())
        body, content_type = service.telemetry.metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)
