"""HTTP side of observability: the access line, HTTP metrics and span end of each exchange
(called by :class:`~modelyard.api.exchange.Exchange`), and ``GET /metrics``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar import Controller, Request, Response, get
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Schema
from litestar.types import Scope

from modelyard.api.schema import DocumentedOperation
from modelyard.core.logs import ACCESS_LOGGER, RequestInfo
from modelyard.core.service import InferenceService

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from modelyard.core.telemetry import Telemetry

__all__ = ["CLIENT_CLOSED", "MetricsController", "end_request_span", "record_request"]

#: Status recorded when the client went away before any response started (nginx's 499).
CLIENT_CLOSED = 499
#: Routes polled by machines: their access lines are DEBUG, not INFO.
QUIET_ROUTES = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready"})
UNMATCHED_ROUTE = "unmatched"

access_log = logging.getLogger(ACCESS_LOGGER)


def record_request(
    telemetry: Telemetry, info: RequestInfo, status: int, seconds: float, route: str | None,
    scope: Scope,
) -> None:
    """The HTTP metrics and the access line of one finished exchange."""
    metrics = telemetry.metrics
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


def end_request_span(
    telemetry: Telemetry, span: Span, token: object | None, info: RequestInfo, status: int,
    route: str | None,
) -> None:
    """End the request span, with what the core learnt about the request as attributes."""
    if not span.is_recording():
        telemetry.tracing.end_request(span, token, method=info.method, status=status,
                                      route=route, attributes={})
        return
    attributes: dict[str, Any] = {
        "modelyard.request_id": info.request_id,
        "modelyard.model": info.model, "modelyard.version": info.version,
        "modelyard.backend": info.backend, "modelyard.cache.result": info.cache,
        "gen_ai.usage.input_tokens": info.prompt_tokens,
        "gen_ai.usage.output_tokens": info.completion_tokens,
    }
    telemetry.tracing.end_request(
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


_EXPOSITION = OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING))


@dataclass
class _ExpositionOperation(DocumentedOperation):
    """``GET /metrics`` answers Prometheus text, or OpenMetrics when the scraper asks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {"text/plain": _EXPOSITION, "application/openmetrics-text": _EXPOSITION}


class MetricsController(Controller):
    path = "/metrics"
    tags = ("Observability",)

    @get("", operation_class=_ExpositionOperation)
    async def metrics(
        self, request: Request[Any, Any, Any], service: InferenceService
    ) -> Response[bytes]:
        """Prometheus metrics (text format, or OpenMetrics when the scraper asks for it)."""
        body, content_type = service.metrics_exposition(request.headers.get("accept"))
        # The exposition's type names its charset already; as ``media_type`` Litestar would
        # append a second one to any text/* type.
        return Response(body, headers={"content-type": content_type})
