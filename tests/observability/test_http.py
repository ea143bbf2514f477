"""The HTTP wrapper on a small app: request ids, access lines, route metrics, request spans."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from litestar import Litestar, get
from litestar.di import Provide

from modelyard.api.exchange import Exchange
from modelyard.api.observability import MetricsController
from modelyard.core.logs import ACCESS_LOGGER, current_request
from modelyard.core.metrics import Metrics
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.telemetry import Telemetry
from modelyard.core.tracing import Tracing

SECRET = "my_0123456789abcdef_" + "k" * 43


@get("/models/{name:str}")
async def use_model(name: str) -> dict[str, Any]:
    info = current_request()
    assert info is not None  # shared with this handler's task (Exchange made one)
    info.model, info.version, info.backend = name, "1", "echo"
    info.add_tokens(3, 4)
    return {"request_id": info.request_id}


@get("/boom")
async def boom() -> None:
    raise RuntimeError("boom")


@pytest.fixture
async def client(
    spans: Any, plugin_host: PluginHost, make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[httpx.AsyncClient, Telemetry, Any]]:
    provider, exporter = spans
    telemetry = Telemetry(metrics=Metrics(process=False), tracing=Tracing(provider))
    service = InferenceService(make_settings(), plugin_host)
    service.telemetry = telemetry  # what the service holds once wired (the integration patch)
    app = Litestar(
        [use_model, boom, MetricsController],
        dependencies={"service": Provide(lambda: service, sync_to_thread=False)},
    )
    app.asgi_handler = Exchange(app.asgi_handler, telemetry)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        yield http, telemetry, exporter


async def test_a_request_id_is_made_or_kept_and_returned(client: Any) -> None:
    http, _, _ = client
    made = await http.get("/models/m")
    assert made.headers["x-request-id"] == made.json()["request_id"]
    assert len(made.headers["x-request-id"]) == 32
    kept = await http.get("/models/m", headers={"X-Request-Id": "abc-123"})
    assert kept.headers["x-request-id"] == "abc-123" == kept.json()["request_id"]
    replaced = await http.get("/models/m", headers={"X-Request-Id": "a b<c>"})
    assert replaced.headers["x-request-id"] not in ("a b<c>", "")


async def test_unrouted_requests_get_an_id_a_metric_and_an_access_line(
    client: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    http, telemetry, _ = client
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        response = await http.get("/nowhere", headers={"X-Request-Id": "lost-1"})
    assert response.status_code == 404
    assert response.headers["x-request-id"] == "lost-1"
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert record.request_id == "lost-1" and record.status == 404 and record.route is None
    assert telemetry.metrics.registry.get_sample_value(
        "modelyard_http_requests_total", {"method": "GET", "route": "unmatched", "status": "404"}
    ) == 1


async def test_the_access_line_says_what_the_core_filled_in(
    client: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    http, telemetry, _ = client
    with caplog.at_level(logging.INFO, logger=ACCESS_LOGGER):
        await http.get("/models/m?api_key=" + SECRET,
                       headers={"Authorization": f"Bearer {SECRET}", "X-Request-Id": "r-1"})
    (record,) = [r for r in caplog.records if r.name == ACCESS_LOGGER]
    assert (record.method, record.path, record.route) == ("GET", "/models/m", "/models/{name}")
    assert (record.model, record.version, record.backend) == ("m", "1", "echo")
    assert (record.prompt_tokens, record.completion_tokens) == (3, 4)
    assert record.status == 200 and record.duration_ms > 0
    ours = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records
                     if r.name.startswith("modelyard"))
    assert SECRET not in ours and "api_key" not in ours  # no header, no query string
    get = telemetry.metrics.registry.get_sample_value
    labels = {"model": "m", "version": "1", "backend": "echo"}
    assert get("modelyard_requests_total", {**labels, "status": "200"}) == 1
    assert get("modelyard_request_duration_seconds_count", labels) == 1


async def test_an_unhandled_error_is_a_500_with_its_id(
    client: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    http, telemetry, exporter = client
    response = await http.get("/boom")
    assert response.status_code == 500 and response.headers["x-request-id"]
    assert telemetry.metrics.registry.get_sample_value(
        "modelyard_http_requests_total", {"method": "GET", "route": "/boom", "status": "500"}
    ) == 1
    (span,) = exporter.get_finished_spans()
    assert span.name == "GET /boom" and not span.status.is_ok


async def test_one_server_span_per_request_with_the_core_attributes(client: Any) -> None:
    http, _, exporter = client
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await http.get("/models/m", headers={"traceparent": traceparent, "X-Request-Id": "r-2"})
    (span,) = exporter.get_finished_spans()
    assert span.name == "GET /models/{name}"
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert span.attributes["modelyard.request_id"] == "r-2"
    assert span.attributes["modelyard.model"] == "m"
    assert span.attributes["gen_ai.usage.output_tokens"] == 4


async def test_metrics_endpoint_serves_the_apps_registry(client: Any) -> None:
    http, _, _ = client
    await http.get("/models/m")
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'modelyard_requests_total{backend="echo",model="m",status="200",version="1"} 1.0' \
        in response.text
    openmetrics = await http.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    # The exposition's own type, once: Litestar must not append a second charset.
    for answer in (response, openmetrics):
        assert answer.headers["content-type"].count("charset") == 1
        assert answer.headers.get_list("content-type") == [answer.headers["content-type"]]


def test_json_access_line_shape(caplog: pytest.LogCaptureFixture) -> None:
    """The fields an access line carries serialize to one JSON object."""
    from modelyard.core.logs import JsonFormatter

    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "GET / %d", (200,), None)
    record.status, record.model = 200, "m"
    line = json.loads(JsonFormatter().format(record))
    assert line["status"] == 200 and line["model"] == "m" and line["message"] == "GET / 200"
