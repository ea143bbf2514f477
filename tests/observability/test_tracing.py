"""Tracing: the request span continues a traceparent; children from live steps or timestamps."""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from modelyard.core.logs import RequestContextFilter
from modelyard.core.tracing import Tracing, otlp_provider

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def test_the_request_span_continues_an_incoming_traceparent(spans: Any) -> None:
    provider, exporter = spans
    tracing = Tracing(provider)
    headers = [(b"traceparent", TRACEPARENT.encode())]
    span, token = tracing.start_request("POST", "/v1/embeddings", headers)
    assert trace.get_current_span() is span
    tracing.end_request(span, token, method="POST", status=200, route="/v1/embeddings",
                        attributes={"modelyard.model": "m"})
    assert trace.get_current_span() is not span
    (done,) = exporter.get_finished_spans()
    assert done.name == "POST /v1/embeddings"
    assert done.kind is SpanKind.SERVER
    assert format(done.context.trace_id, "032x") == TRACE_ID
    assert done.parent is not None and format(done.parent.span_id, "016x") == PARENT_ID
    assert done.attributes["http.response.status_code"] == 200
    assert done.attributes["http.route"] == "/v1/embeddings"
    assert done.attributes["modelyard.model"] == "m"


def test_a_request_without_traceparent_starts_a_trace_and_5xx_is_an_error(spans: Any) -> None:
    provider, exporter = spans
    tracing = Tracing(provider)
    span, token = tracing.start_request("GET", "/x", [(b"traceparent", b"garbage")])
    tracing.end_request(span, token, method="GET", status=503, route=None, attributes={})
    (done,) = exporter.get_finished_spans()
    assert done.parent is None
    assert done.name == "GET"
    assert done.status.status_code is StatusCode.ERROR


def test_live_children_nest_under_the_current_span_and_vanish_outside_one(spans: Any) -> None:
    provider, exporter = spans
    tracing = Tracing(provider)
    with tracing.span("modelyard.auth") as orphan:
        assert not orphan.is_recording()  # no request span: nothing is created
    span, token = tracing.start_request("GET", "/", [])
    with tracing.span("modelyard.auth", {"k": "v"}):
        pass
    tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})
    child, parent = exporter.get_finished_spans()
    assert child.name == "modelyard.auth" and child.attributes["k"] == "v"
    assert child.parent.span_id == parent.context.span_id


def test_recorded_children_take_the_given_times(spans: Any) -> None:
    provider, exporter = spans
    tracing = Tracing(provider)
    assert tracing.record("x", 1, 2) is None  # no recording parent
    span, token = tracing.start_request("GET", "/", [])
    start = time.time_ns()
    outer = tracing.record("outer", start, start + 5_000, attributes={"n": 3})
    tracing.record("inner", start + 1_000, start + 4_000, parent=outer, error=True)
    assert tracing.record("never", 0, start) is None  # no start time: nothing to show
    tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    assert set(by_name) == {"outer", "inner", "GET /"}
    assert (by_name["outer"].start_time, by_name["outer"].end_time) == (start, start + 5_000)
    assert by_name["inner"].parent.span_id == by_name["outer"].context.span_id
    assert by_name["outer"].parent.span_id == by_name["GET /"].context.span_id
    assert by_name["inner"].status.status_code is StatusCode.ERROR


def test_without_an_sdk_everything_is_a_no_op() -> None:
    tracing = Tracing(trace.NoOpTracerProvider())
    span, token = tracing.start_request("GET", "/", [(b"traceparent", TRACEPARENT.encode())])
    assert not span.is_recording()
    assert tracing.record("x", time.time_ns(), time.time_ns()) is None
    tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})
    tracing.shutdown()  # nothing owned, nothing to do


def test_a_provider_passed_in_is_not_shut_down_unless_owned(spans: Any) -> None:
    provider, exporter = spans
    Tracing(provider).shutdown()
    tracing = Tracing(provider)
    span, token = tracing.start_request("GET", "/", [])
    tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})
    assert len(exporter.get_finished_spans()) == 1  # still exporting


def test_following_an_unconfigured_global_provider_costs_nothing() -> None:
    tracing = Tracing()  # the global provider: a proxy until an SDK is configured
    assert not tracing.active
    span, token = tracing.start_request("GET", "/", [(b"accept", b"*/*")],
                                        has_traceparent=False)
    assert span is trace.INVALID_SPAN and token is None
    tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})


def test_without_an_sdk_a_callers_trace_id_still_reaches_the_logs() -> None:
    tracing = Tracing()
    span, token = tracing.start_request("GET", "/", [(b"traceparent", TRACEPARENT.encode())])
    try:
        assert trace.get_current_span().get_span_context().trace_id == int(TRACE_ID, 16)
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        RequestContextFilter().filter(record)
        assert record.trace_id == TRACE_ID
    finally:
        tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, str, int]]] = []

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", 0))
        self.rfile.read(length)
        self.received.append((self.path, self.headers.get("content-type", ""), length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, int]]]]:
    received: list[tuple[str, str, int]] = []
    handler = type("Handler", (_Collector,), {"received": received})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1/traces", received
    finally:
        server.shutdown()
        server.server_close()


def test_otlp_provider_exports_to_the_collector(
    collector: tuple[str, list[tuple[str, str, int]]],
) -> None:
    pytest.importorskip("opentelemetry.exporter.otlp.proto.http")
    url, received = collector
    tracing = Tracing(otlp_provider(url), owned=True)
    span, token = tracing.start_request("GET", "/", [])
    tracing.end_request(span, token, method="GET", status=200, route="/", attributes={})
    tracing.shutdown()  # flushes the batch processor: the POST has happened when it returns
    assert received and received[0][0] == "/v1/traces"
    assert received[0][1] == "application/x-protobuf" and received[0][2] > 0
