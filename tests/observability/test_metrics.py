"""Metrics: one registry per app, bound per-version children, state read at scrape time."""

from __future__ import annotations

from collections.abc import Callable

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from modelyard.core.errors import ModelyardError
from modelyard.core.metrics import Metrics
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import EmbeddingRequest
from modelyard.testing.clock import FakeClock


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()  # would raise "Duplicated timeseries" with a shared registry
    a.version("m", "1", "echo").request(200, 0.01)
    assert a.registry.get_sample_value(
        "modelyard_requests_total", {"model": "m", "version": "1", "backend": "echo",
                                     "status": "200"}) == 1.0
    assert b.registry.get_sample_value(
        "modelyard_requests_total", {"model": "m", "version": "1", "backend": "echo",
                                     "status": "200"}) is None


def test_version_children_are_bound_once() -> None:
    metrics = Metrics(process=False)
    assert metrics.version("m", "1", "echo") is metrics.version("m", "1", "echo")
    assert metrics.version("m", "1", "echo") is not metrics.version("m", "2", "echo")


def test_request_batch_and_token_recording() -> None:
    metrics = Metrics(process=False)
    bound = metrics.version("m", "1", "echo")
    bound.request(200, 0.02)
    bound.request(503, 0.001)
    bound.request("200", 0.03)
    bound.batch(4, 0.01)
    bound.tokens(5, 7)
    bound.tokens(3, None)
    get = metrics.registry.get_sample_value
    mv = {"model": "m", "version": "1"}
    assert get("modelyard_requests_total", {**mv, "backend": "echo", "status": "200"}) == 2
    assert get("modelyard_requests_total", {**mv, "backend": "echo", "status": "503"}) == 1
    assert get("modelyard_request_duration_seconds_count", {**mv, "backend": "echo"}) == 3
    assert get("modelyard_batch_size_count", mv) == 1
    assert get("modelyard_batch_size_bucket", {**mv, "le": "4.0"}) == 1
    assert get("modelyard_batch_size_bucket", {**mv, "le": "2.0"}) == 0
    assert get("modelyard_prompt_tokens_total", mv) == 8
    assert get("modelyard_generated_tokens_total", mv) == 7


def test_cache_auth_and_rate_limit_recording_api() -> None:
    metrics = Metrics(process=False)
    metrics.cache_lookup("memory", hit=False)
    metrics.cache_lookup("disk", hit=True)
    metrics.cache_bytes("disk", 4096)
    metrics.cache_dedup_ratio("disk", 2.5)
    metrics.cache_coalesced_request("m")
    metrics.auth_failure("invalid")
    metrics.rate_limited_request("m")
    get = metrics.registry.get_sample_value
    assert get("modelyard_cache_misses_total", {"tier": "memory"}) == 1
    assert get("modelyard_cache_hits_total", {"tier": "disk"}) == 1
    assert get("modelyard_cache_hits_total", {"tier": "memory"}) is None
    assert get("modelyard_cache_bytes", {"tier": "disk"}) == 4096
    assert get("modelyard_cache_dedup_ratio", {"tier": "disk"}) == 2.5
    assert get("modelyard_cache_coalesced_requests_total", {"model": "m"}) == 1
    assert get("modelyard_auth_failures_total", {"reason": "invalid"}) == 1
    assert get("modelyard_rate_limited_requests_total", {"model": "m"}) == 1


def test_process_collectors_and_build_info_are_exported() -> None:
    body, content_type = Metrics().exposition()
    assert content_type.startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info",
            "modelyard_build_info"} <= names


def test_openmetrics_when_the_scraper_asks() -> None:
    body, content_type = Metrics(process=False).exposition(
        "application/openmetrics-text; version=1.0.0"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")


def test_every_name_has_the_prefix_and_a_valid_suffix() -> None:
    metrics = Metrics(process=False)
    for family in metrics.registry.collect():
        if family.name.startswith(("process_", "python_")):
            continue
        assert family.name.startswith("modelyard_"), family.name
        if family.type == "counter":
            assert not family.name.endswith("_total")  # the client appends it on exposition
        if family.type == "histogram" and "batch_size" not in family.name:
            assert family.name.endswith("_seconds"), family.name


async def test_state_is_read_from_the_service_at_scrape_time(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock,
) -> None:
    settings = make_settings(models=[
        {"name": "f", "backend": "failing", "source": ".", "task": "embeddings",
         "breaker": {"window_size": 2, "minimum_calls": 2, "wait_in_open_ms": 1000}},
        {"name": "e", "backend": "echo", "source": ".", "task": "embeddings"},
    ], aliases=[{"name": "any", "targets": ["f", "e"]}])
    metrics = Metrics(process=False)
    service = InferenceService(  # the service makes its telemetry watch its models
        settings, plugin_host, clock=fake_clock, telemetry=Telemetry(metrics=metrics)
    )
    await service.start()
    try:
        await service.wait_until_loaded()
        get = metrics.registry.get_sample_value
        f1 = {"model": "f", "version": "1"}
        assert get("modelyard_circuit_breaker_state", {**f1, "state": "closed"}) == 1
        assert get("modelyard_model_version_state",
                   {**f1, "backend": "failing", "state": "active"}) == 1
        assert get("modelyard_model_load_progress_ratio", f1) == 1.0
        assert get("modelyard_queue_depth", f1) == 0
        for _ in range(2):
            with pytest.raises(ModelyardError):
                await service.infer("f", EmbeddingRequest(("x",)))
        assert get("modelyard_circuit_breaker_state", {**f1, "state": "open"}) == 1
        assert get("modelyard_circuit_breaker_state", {**f1, "state": "closed"}) == 0
        assert get("modelyard_circuit_breaker_transitions_total",
                   {**f1, "from_state": "closed", "to_state": "open"}) == 1
        await service.infer("any", EmbeddingRequest(("x",)))  # f is skipped: open
        assert get("modelyard_failovers_total", {"alias": "any"}) == 1
        assert get("modelyard_failover_exhausted_total", {"alias": "any"}) == 0
        fake_clock.advance(1.0)
        assert get("modelyard_circuit_breaker_state", {**f1, "state": "half_open"}) == 1
        assert get("modelyard_circuit_breaker_transitions_total",
                   {**f1, "from_state": "open", "to_state": "half_open"}) == 1
    finally:
        await service.stop()
