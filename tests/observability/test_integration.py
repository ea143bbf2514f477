"""Observability through the whole app: metrics after a known sequence, span trees, request
ids, progress, and logs that never carry a credential or (by default) a prompt."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from click.testing import CliRunner
from opentelemetry.sdk.trace import ReadableSpan
from prometheus_client.parser import text_string_to_metric_families

from modelyard.api.app import create_app
from modelyard.cli import cli
from modelyard.core.errors import ConfigError
from modelyard.core.logs import ACCESS_LOGGER, JsonFormatter, RequestContextFilter
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.sources import Progress
from modelyard.core.telemetry import Telemetry
from modelyard.core.tracing import Tracing
from modelyard.testing.clock import FakeClock

KEY = "my_0123456789abcdef_" + "Q" * 43
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
EMBED = {"name": "e", "backend": "echo", "source": ".", "task": "embeddings"}
CHAT = {"name": "c", "backend": "echo", "source": ".", "task": "chat"}


@dataclass
class App:
    client: httpx.AsyncClient
    service: InferenceService
    exporter: Any

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape ``GET /metrics`` and index every sample by name and sorted labels."""
        response = await self.client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
        }

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


def sample(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


StartApp = Callable[..., Any]


@pytest.fixture
async def start_app(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], spans: Any,
) -> AsyncIterator[StartApp]:
    provider, exporter = spans

    async with contextlib.AsyncExitStack() as stack:

        async def start(*models: dict[str, Any], clock: Any = None, **tables: Any) -> App:
            settings = make_settings(models=list(models), **tables)
            telemetry = Telemetry(tracing=Tracing(provider),
                                  log_prompts=settings.server.log_prompts)
            extra = {"clock": clock} if clock is not None else {}
            service = InferenceService(settings, plugin_host, telemetry=telemetry, **extra)
            app = create_app(settings, plugins=plugin_host, service=service)
            await service.start()
            stack.push_async_callback(service.stop)
            await service.wait_until_loaded()
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                       base_url="http://testserver")
            await stack.enter_async_context(client)
            return App(client, service, exporter)

        yield start


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged (DEBUG and up, every logger) as the server's JSON lines."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def _wait_state(client: httpx.AsyncClient, url: str, state: str) -> dict[str, Any]:
    for _ in range(500):  # bounded: loading the echo backend takes microseconds
        body: dict[str, Any] = (await client.get(url)).json()
        if body["state"] == state:
            return body
        await asyncio.sleep(0.005)
    raise AssertionError(f"{url} never reached {state}: {body}")


# -- metrics -------------------------------------------------------------------------------


async def test_metrics_after_a_known_sequence_of_requests(start_app: StartApp) -> None:
    api = await start_app(EMBED, CHAT)
    for text in ("one two", "three four", "five six"):
        r = await api.client.post("/v1/embeddings", json={"model": "e", "input": text})
        assert r.status_code == 200
    assert (await api.client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
            ).status_code == 404
    chat = {"model": "c", "messages": [{"role": "user", "content": "a b c d"}]}
    assert (await api.client.post("/v1/chat/completions", json=chat)).status_code == 200
    streamed = await api.client.post("/v1/chat/completions", json={**chat, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")

    m = await api.metrics()
    e = {"model": "e", "version": "1"}
    c = {"model": "c", "version": "1"}
    assert sample(m, "modelyard_requests_total", **e, backend="echo", status="200") == 3
    assert sample(m, "modelyard_requests_total", **c, backend="echo", status="200") == 2
    assert sample(m, "modelyard_request_duration_seconds_count", **e, backend="echo") == 3
    assert sample(m, "modelyard_http_requests_total", method="POST", route="/v1/embeddings",
                  status="404") == 1
    # Sequential requests: three queue waits and three batches of one.
    assert sample(m, "modelyard_queue_wait_seconds_count", **e) == 3
    assert sample(m, "modelyard_batch_size_count", **e) == 3
    assert sample(m, "modelyard_batch_size_sum", **e) == 3
    assert sample(m, "modelyard_backend_call_duration_seconds_count", **e, backend="echo") == 3
    assert sample(m, "modelyard_queue_depth", **e) == 0
    assert sample(m, "modelyard_prompt_tokens_total", **e) == 6
    # Chat: 4 prompt and 4 generated tokens, once batched and once streamed.
    assert sample(m, "modelyard_prompt_tokens_total", **c) == 8
    assert sample(m, "modelyard_generated_tokens_total", **c) == 8
    assert sample(m, "modelyard_time_to_first_token_seconds_count", **c) == 1
    assert sample(m, "modelyard_inter_token_latency_seconds_count", **c) == 3  # 4 words
    assert sample(m, "modelyard_model_load_duration_seconds_count", **e, backend="echo") == 1
    assert sample(m, "modelyard_model_version_state", **e, backend="echo", state="active") == 1
    assert sample(m, "modelyard_model_version_state", **e, backend="echo", state="ready") == 0
    assert sample(m, "modelyard_circuit_breaker_state", **e, state="closed") == 1
    assert sample(m, "process_cpu_seconds_total") is not None


async def test_a_breaker_trip_on_a_fake_clock(start_app: StartApp, fake_clock: FakeClock) -> None:
    failing = {"name": "f", "backend": "failing", "source": ".", "task": "embeddings",
               "breaker": {"window_size": 2, "minimum_calls": 2, "wait_in_open_ms": 10_000}}
    api = await start_app(failing, clock=fake_clock)
    body = {"model": "f", "input": "x"}
    statuses = [(await api.client.post("/v1/embeddings", json=body)).status_code
                for _ in range(3)]
    assert statuses == [500, 500, 503]
    m = await api.metrics()
    f = {"model": "f", "version": "1"}
    assert sample(m, "modelyard_requests_total", **f, backend="failing", status="500") == 2
    assert sample(m, "modelyard_requests_total", **f, backend="failing", status="503") == 1
    assert sample(m, "modelyard_circuit_breaker_state", **f, state="open") == 1
    assert sample(m, "modelyard_circuit_breaker_transitions_total", **f,
                  from_state="closed", to_state="open") == 1
    assert sample(m, "modelyard_batch_size_count", **f) == 2  # the refused call never ran
    fake_clock.advance(10.0)
    m = await api.metrics()
    assert sample(m, "modelyard_circuit_breaker_state", **f, state="half_open") == 1
    assert sample(m, "modelyard_circuit_breaker_transitions_total", **f,
                  from_state="open", to_state="half_open") == 1


async def test_swap_and_rollback_through_the_admin_api(start_app: StartApp) -> None:
    api = await start_app({"name": "m", "backend": "echo", "source": ".", "task": "embeddings"})
    added = await api.client.post("/admin/models/m/versions", json={"version": "2", "source": "."})
    assert added.status_code == 202
    ready = await _wait_state(api.client, added.headers["location"], "ready")
    assert (ready["phase"], ready["progress"]) == ("ready", 100.0)
    assert (await api.client.post("/admin/models/m/swap", json={"to": "2"})).status_code == 200
    m = await api.metrics()
    assert sample(m, "modelyard_model_swaps_total", model="m") == 1
    assert sample(m, "modelyard_model_version_state", model="m", version="2", backend="echo",
                  state="active") == 1
    assert sample(m, "modelyard_model_version_state", model="m", version="1", backend="echo",
                  state="deprecated") == 1
    assert sample(m, "modelyard_model_load_duration_seconds_count", model="m", version="2",
                  backend="echo") == 1
    assert (await api.client.post("/admin/models/m/rollback")).status_code == 200
    m = await api.metrics()
    assert sample(m, "modelyard_model_rollbacks_total", model="m", reason="manual") == 1
    assert sample(m, "modelyard_model_version_state", model="m", version="1", backend="echo",
                  state="active") == 1


async def test_a_cache_hit_through_the_recording_api(start_app: StartApp) -> None:
    api = await start_app(EMBED)
    metrics = api.service.telemetry.metrics
    metrics.cache_lookup("memory", hit=False)
    metrics.cache_lookup("disk", hit=True)
    metrics.cache_coalesced_request("e")
    m = await api.metrics()
    assert sample(m, "modelyard_cache_hits_total", tier="disk") == 1
    assert sample(m, "modelyard_cache_misses_total", tier="memory") == 1
    assert sample(m, "modelyard_cache_coalesced_requests_total", model="e") == 1


async def test_a_response_cache_hit_shows_in_the_access_line_and_span(
    start_app: StartApp, plugin_host: PluginHost, json_log: io.StringIO, tmp_path: Path,
) -> None:
    if "cache" not in {f.name for f in msgspec.structs.fields(Settings)}:
        pytest.skip("the response cache is not wired into the service")
    from modelyard.cache import plugin as cache_plugin

    plugin_host.register(cache_plugin, name="cache")
    try:
        api = await start_app({**CHAT, "backend": "counting"}, cache={
            "enabled": True, "directory": str(tmp_path / "c"), "tiers": [{"tier": "memory"}]})
        chat = {"model": "c", "temperature": 0,
                "messages": [{"role": "user", "content": "same again"}]}
        api.exporter.clear()
        first = await api.client.post("/v1/chat/completions", json=chat)
        second = await api.client.post("/v1/chat/completions", json=chat)
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    finally:
        plugin_host.unregister("cache")
    access = [line for line in _lines(json_log) if line["logger"] == ACCESS_LOGGER]
    assert [a.get("cache") for a in access] == ["miss", "hit"]
    roots = [s for s in api.spans() if s.name == "POST /v1/chat/completions"]
    assert [r.attributes["modelyard.cache.result"] for r in roots] == ["miss", "hit"]
    m = await api.metrics()
    assert sample(m, "modelyard_requests_total", model="c", version="1", backend="counting",
                  status="200") == 2
    assert sample(m, "modelyard_batch_size_count", model="c", version="1") == 1  # one real run


async def test_two_apps_in_one_process_keep_their_own_metrics(start_app: StartApp) -> None:
    first, second = await start_app(EMBED), await start_app(EMBED)
    await first.client.post("/v1/embeddings", json={"model": "e", "input": "x"})
    assert sample(await first.metrics(), "modelyard_batch_size_count", model="e",
                  version="1") == 1
    assert sample(await second.metrics(), "modelyard_batch_size_count", model="e",
                  version="1") == 0


# -- tracing ---------------------------------------------------------------------------------


def _tree(spans: list[ReadableSpan]) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans}


def _parent_of(span: ReadableSpan, spans: list[ReadableSpan]) -> ReadableSpan | None:
    for candidate in spans:
        if span.parent is not None and candidate.context.span_id == span.parent.span_id:
            return candidate
    return None


async def test_span_tree_of_a_batched_request(start_app: StartApp) -> None:
    api = await start_app(EMBED)
    api.exporter.clear()
    r = await api.client.post("/v1/embeddings", json={"model": "e", "input": "one two"},
                              headers={"traceparent": TRACEPARENT, "X-Request-Id": "t-1"})
    assert r.status_code == 200
    spans = api.spans()
    tree = _tree(spans)
    assert set(tree) == {"POST /v1/embeddings", "modelyard.queue", "modelyard.batch",
                         "modelyard.backend"}
    root = tree["POST /v1/embeddings"]
    assert format(root.context.trace_id, "032x") == TRACE_ID  # the caller's trace continues
    assert all(format(s.context.trace_id, "032x") == TRACE_ID for s in spans)
    assert _parent_of(tree["modelyard.queue"], spans) is root
    assert _parent_of(tree["modelyard.batch"], spans) is root
    assert _parent_of(tree["modelyard.backend"], spans) is tree["modelyard.batch"]
    assert root.attributes["modelyard.model"] == "e"
    assert root.attributes["modelyard.version"] == "1"
    assert root.attributes["modelyard.request_id"] == "t-1"
    assert root.attributes["gen_ai.usage.input_tokens"] == 2
    assert root.attributes["http.response.status_code"] == 200
    assert tree["modelyard.batch"].attributes["modelyard.batch.size"] == 1
    assert tree["modelyard.backend"].attributes["modelyard.backend"] == "echo"
    queue, batch = tree["modelyard.queue"], tree["modelyard.batch"]
    assert queue.end_time <= batch.start_time <= batch.end_time <= root.end_time


async def test_requests_batched_together_each_get_their_own_tree(start_app: StartApp) -> None:
    batched = {**EMBED, "batching": {"max_batch_size": 2, "max_queue_delay_ms": 5000}}
    api = await start_app(batched)
    api.exporter.clear()
    body = {"model": "e", "input": "x"}
    first, second = await asyncio.gather(api.client.post("/v1/embeddings", json=body),
                                         api.client.post("/v1/embeddings", json=body))
    assert first.status_code == second.status_code == 200
    spans = api.spans()
    batches = [s for s in spans if s.name == "modelyard.batch"]
    roots = {s.context.span_id for s in spans if s.name == "POST /v1/embeddings"}
    assert len(batches) == 2 and len(roots) == 2
    assert {b.attributes["modelyard.batch.size"] for b in batches} == {2}
    assert {b.parent.span_id for b in batches if b.parent is not None} == roots


async def test_span_tree_of_a_stream(start_app: StartApp) -> None:
    api = await start_app(CHAT)
    api.exporter.clear()
    chat = {"model": "c", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
    r = await api.client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200
    spans = api.spans()
    tree = _tree(spans)
    assert set(tree) == {"POST /v1/chat/completions", "modelyard.backend"}
    backend = tree["modelyard.backend"]
    assert _parent_of(backend, spans) is tree["POST /v1/chat/completions"]
    assert backend.attributes["modelyard.streaming"] is True
    assert backend.attributes["gen_ai.usage.output_tokens"] == 3
    assert tree["POST /v1/chat/completions"].attributes["gen_ai.usage.output_tokens"] == 3


def test_the_lifespan_flushes_an_owned_exporter_at_shutdown(
    plugin_host: PluginHost, make_settings: Callable[..., Settings],
) -> None:
    """Spans still batched when the server stops (SIGTERM) reach the exporter."""
    from litestar.testing import TestClient
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
        InMemorySpanExporter,
    )

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    # A delay no test waits out: only the shutdown flush can deliver the span.
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=600_000))
    settings = make_settings(models=[EMBED])
    telemetry = Telemetry(tracing=Tracing(provider, owned=True))
    service = InferenceService(settings, plugin_host, telemetry=telemetry)
    with TestClient(create_app(settings, plugins=plugin_host, service=service)) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert exporter.get_finished_spans() == ()
    assert [s.name for s in exporter.get_finished_spans()] == ["GET /v2/health/live"]


# -- request ids and logs --------------------------------------------------------------------


async def test_request_id_round_trip(start_app: StartApp, json_log: io.StringIO) -> None:
    api = await start_app(EMBED)
    kept = await api.client.post("/v1/embeddings", json={"model": "e", "input": "x"},
                                 headers={"X-Request-Id": "client-7"})
    assert kept.headers["x-request-id"] == "client-7"
    made = await api.client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert made.status_code == 404 and len(made.headers["x-request-id"]) == 32
    access = [line for line in _lines(json_log) if line["logger"] == ACCESS_LOGGER]
    assert [a["request_id"] for a in access] == ["client-7", made.headers["x-request-id"]]
    first = access[0]
    assert (first["model"], first["version"], first["backend"], first["status"]) == (
        "e", "1", "echo", 200)
    assert first["prompt_tokens"] == 1 and first["duration_ms"] > 0
    assert first["route"] == "/v1/embeddings"
    assert "prompt" not in first  # log_prompts is off by default
    assert "model" not in access[1]  # never resolved to a model


async def test_no_secret_and_no_prompt_in_any_log_line(
    start_app: StartApp, json_log: io.StringIO,
) -> None:
    api = await start_app(CHAT, {"name": "f", "backend": "failing", "source": ".",
                                 "task": "chat"})
    headers = {"Authorization": f"Bearer {KEY}", "X-Api-Key": KEY}
    prompt = "my very private prompt"
    for model in ("c", "f", "nope"):
        await api.client.post("/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": prompt}]})
    await api.client.get(f"/v1/models?api_key={KEY}", headers=headers)
    text = json_log.getvalue()
    assert text.count(f'"logger":"{ACCESS_LOGGER}"') == 4
    assert "failing backend always fails" in text  # the 500 was logged, with its traceback
    assert KEY[20:] not in text
    assert prompt not in text


async def test_prompts_are_logged_only_when_enabled(
    start_app: StartApp, json_log: io.StringIO,
) -> None:
    api = await start_app(CHAT, server={"log_prompts": True})
    chat = {"model": "c", "messages": [{"role": "user", "content": "tell me"}]}
    await api.client.post("/v1/chat/completions", json=chat)
    (access,) = [line for line in _lines(json_log) if line["logger"] == ACCESS_LOGGER]
    assert access["prompt"] == "user: tell me"


async def test_model_state_changes_are_logged_with_fields(
    start_app: StartApp, json_log: io.StringIO,
) -> None:
    await start_app(EMBED)
    changes = [line for line in _lines(json_log) if "new_state" in line]
    assert [(c["model"], c["old_state"], c["new_state"]) for c in changes] == [
        ("e", None, "loading"), ("e", "loading", "ready"), ("e", "ready", "active")]


# -- progress and configuration --------------------------------------------------------------


async def test_load_progress_only_moves_forward(
    plugin_host: PluginHost, make_settings: Callable[..., Settings],
) -> None:
    seen: list[float] = []
    service: InferenceService | None = None

    def resolver(source: str, cache_dir: Path, progress: Progress) -> Path:
        assert service is not None
        version = service.registry.entry("e").versions["1"]
        for percent in (0.0, 40.0, 100.0):
            progress("preparing", percent)
            seen.append(version.progress)
        return Path(".")

    service = InferenceService(make_settings(models=[EMBED]), plugin_host,
                               source_resolver=resolver)
    await service.start()
    try:
        await service.wait_until_loaded()
        version = service.registry.entry("e").versions["1"]
        assert seen == [0.0, 20.0, 50.0]  # preparation fills the first half
        assert (version.progress, version.phase) == (100.0, "ready")
        await service.unload_model("e")
        assert (version.progress, version.phase) == (0.0, "unloaded")
    finally:
        await service.stop()


def test_log_format_is_checked(make_settings: Callable[..., Settings]) -> None:
    assert make_settings().server.log_format == "json"
    assert make_settings(server={"log_format": "text"}).server.log_format == "text"
    with pytest.raises(ConfigError, match=r"\$\.server\.log_format"):
        make_settings(server={"log_format": "yaml"})


def test_serve_offers_the_observability_options() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    assert "--otlp-endpoint" in result.output and "--log-format" in result.output

