"""Tracing with the OpenTelemetry API: a span per request, child spans for each step.

Only ``opentelemetry-api`` is needed: with no SDK configured every span is a no-op and the
children are not even created. ``modelyard serve --otlp-endpoint URL`` (extra ``otel``)
builds a :func:`otlp_provider` for the app; an embedding application can pass any
``TracerProvider`` instead, or configure the global one (``opentelemetry-instrument``).

Queue wait, batch execution and the backend call happen in the batcher's worker, shared by
every request of a batch; their spans are created for each request afterwards, from the
timestamps the batcher took, so each request's trace shows its own wait and its own batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import (
    INVALID_SPAN,
    NoOpTracerProvider,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)

from modelyard._version import __version__
from modelyard.core.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.util.types import AttributeValue

__all__ = ["RawHeaders", "Tracing", "otlp_provider"]

Attributes = Mapping[str, "AttributeValue"]
#: ASGI's ``scope["headers"]``: lower-case names, latin-1 bytes.
RawHeaders = Sequence[tuple[bytes, bytes]]

AUTH_SPAN = "modelyard.auth"
CACHE_SPAN = "modelyard.cache.lookup"
QUEUE_SPAN = "modelyard.queue"
BATCH_SPAN = "modelyard.batch"
BACKEND_SPAN = "modelyard.backend"


class Tracing:
    """The app's tracer and the span shapes modelyard emits."""

    def __init__(
        self, provider: trace.TracerProvider | None = None, *, owned: bool = False
    ) -> None:
        #: None follows the global provider, so a later ``set_tracer_provider`` still applies.
        self.provider = provider
        #: Whether :meth:`shutdown` may flush and stop ``provider`` (one built for this app).
        self.owned = owned
        source = provider if provider is not None else trace.get_tracer_provider()
        self._tracer = source.get_tracer("modelyard", __version__)

    @property
    def active(self) -> bool:
        """False while spans can only be no-ops: no provider of ours and no global SDK."""
        if self.provider is not None:
            return True
        return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider | NoOpTracerProvider)

    # -- the request span ------------------------------------------------------------------

    def start_request(
        self, method: str, path: str, headers: RawHeaders, *, has_traceparent: bool = True
    ) -> tuple[Span, object | None]:
        """Start the server span (continuing an incoming ``traceparent``) and make it current.

        Returns the span and the token to pass to :meth:`end_request`. With no SDK and no
        ``traceparent`` there is nothing to record or pass on, so nothing is done at all;
        with a ``traceparent`` the caller's trace id still reaches the log lines.
        """
        if not has_traceparent and not self.active:
            return INVALID_SPAN, None
        parent = propagate.extract(headers, getter=_ASGI_HEADERS)
        span = self._tracer.start_span(
            method, context=parent, kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, token

    @staticmethod
    def end_request(
        span: Span, token: object | None, *, method: str, status: int, route: str | None,
        attributes: Attributes,
    ) -> None:
        """Name the span after its route, record the outcome and end it."""
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]
        if not span.is_recording():
            return
        if route:
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attributes(attributes)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # -- children ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def span(self, name: str, attributes: Attributes | None = None) -> Iterator[Span]:
        """A child of the current span for a step run now (auth, cache lookup); no-op if none."""
        if not trace.get_current_span().is_recording():
            yield INVALID_SPAN
            return
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    @staticmethod
    def carrier() -> dict[str, str]:
        """The current trace context as ``traceparent`` fields, for a call to another process."""
        fields: dict[str, str] = {}
        propagate.inject(fields)
        return fields

    @contextlib.contextmanager
    def remote_span(self, name: str, carrier: Mapping[str, str]) -> Iterator[Span]:
        """A span continuing the trace another process sent in ``carrier`` (a replica's
        part of a request); no-op when that process sent none and nothing records here."""
        if not carrier and not self.active:
            yield INVALID_SPAN
            return
        parent = propagate.extract(dict(carrier))
        with self._tracer.start_as_current_span(
            name, context=parent, kind=SpanKind.SERVER
        ) as span:
            yield span

    def record(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        *,
        parent: Span | None = None,
        attributes: Attributes | None = None,
        error: bool = False,
    ) -> Span | None:
        """A finished child span from timestamps taken elsewhere.

        ``parent`` defaults to the current span; nothing is created (None) when that one is
        not recording. An explicit parent may have ended already (a span recorded here).
        """
        if parent is None:
            parent = trace.get_current_span()
            if not parent.is_recording():
                return None
        if start_ns <= 0:
            return None
        span = self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), attributes=attributes,
            start_time=start_ns,
        )
        if error:
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=max(start_ns, end_ns))
        return span

    @staticmethod
    def current() -> Span:
        return trace.get_current_span()

    @staticmethod
    def now_ns() -> int:
        return time.time_ns()

    def shutdown(self) -> None:
        """Flush and stop the provider if this app owns it (an OTLP one); others are left alone."""
        shutdown = getattr(self.provider, "shutdown", None)
        if self.owned and callable(shutdown):
            shutdown()


class _AsgiHeaders(Getter[RawHeaders]):
    """Reads propagation headers straight from ``scope["headers"]`` (no dict built per request)."""

    def get(self, carrier: RawHeaders, key: str) -> list[str] | None:
        wanted = key.lower().encode("latin-1")
        found = [value.decode("latin-1") for name, value in carrier if name == wanted]
        return found or None

    def keys(self, carrier: RawHeaders) -> list[str]:
        return [name.decode("latin-1") for name, _ in carrier]


_ASGI_HEADERS = _AsgiHeaders()


def otlp_provider(endpoint: str, *, service_name: str = "modelyard") -> trace.TracerProvider:
    """An SDK provider exporting over OTLP/HTTP to ``endpoint`` (needs ``modelyard[otel]``).

    ``endpoint`` is the collector's traces URL, e.g. ``http://localhost:4318/v1/traces``.
    """
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            f"--otlp-endpoint needs the 'otel' extra (pip install 'modelyard[otel]'): {exc}"
        ) from None
    provider = TracerProvider(
        resource=Resource.create({"service.name": service_name, "service.version": __version__})
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider
