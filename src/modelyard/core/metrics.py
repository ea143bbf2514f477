"""Prometheus metrics: one :class:`Metrics` per app, each with its own CollectorRegistry.

Counters and histograms that events drive (requests, queue waits, batches, tokens, loads,
swaps) are recorded as the events happen, through children bound once per model version so
the hot path does no label lookups. Everything that is state (queue depth, breaker state,
version state, failover counters the chains keep anyway) is read from the registry when
Prometheus scrapes, so it costs nothing between scrapes and can never drift from the truth.

One process by design: the registry lives in the serving process. Scale out with more
processes behind a balancer and scrape each one (see docs/observability.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder

from modelyard._version import __version__
from modelyard.core.metrics_state import BACKEND_LABELS, MODEL_LABELS, PREFIX, StateCollector

if TYPE_CHECKING:
    from modelyard.core.failover import FailoverChain
    from modelyard.core.registry import ModelRegistry, ModelVersion

__all__ = ["Metrics", "VersionMetrics", "exposition"]


# Seconds; request-scale buckets reach minutes because generation can take that long.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
QUEUE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
LOAD_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class VersionMetrics:
    """The children of every per-version metric, bound once for one model version."""

    __slots__ = (
        "_metrics",
        "_requests",
        "backend_call",
        "batch_size",
        "generated_tokens",
        "inter_token",
        "labels",
        "load_duration",
        "prompt_tokens",
        "queue_wait",
        "request_duration",
        "time_to_first_token",
    )

    def __init__(self, metrics: Metrics, model: str, version: str, backend: str) -> None:
        self._metrics = metrics
        self.labels = (model, version, backend)
        mv = (model, version)
        self.request_duration = metrics.request_duration.labels(*self.labels)
        self.queue_wait = metrics.queue_wait.labels(*mv)
        self.batch_size = metrics.batch_size.labels(*mv)
        self.backend_call = metrics.backend_call.labels(*self.labels)
        self.time_to_first_token = metrics.time_to_first_token.labels(*mv)
        self.inter_token = metrics.inter_token_latency.labels(*mv)
        self.prompt_tokens = metrics.prompt_tokens.labels(*mv)
        self.generated_tokens = metrics.generated_tokens.labels(*mv)
        self.load_duration = metrics.load_duration.labels(*self.labels)
        self._requests: dict[str, Any] = {}

    def request(self, status: int | str, seconds: float) -> None:
        """One finished inference request with its HTTP status and duration."""
        key = str(status)
        child = self._requests.get(key)
        if child is None:
            child = self._requests[key] = self._metrics.requests.labels(*self.labels, key)
        child.inc()
        self.request_duration.observe(seconds)

    def batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.backend_call.observe(seconds)

    def tokens(self, prompt: int | None, generated: int | None) -> None:
        if prompt:
            self.prompt_tokens.inc(prompt)
        if generated:
            self.generated_tokens.inc(generated)


class Metrics:
    """Every modelyard metric, registered in ``registry`` (a new one unless given)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._synced: dict[tuple[int, tuple[str, ...]], int] = {}
        if process:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._versions: dict[tuple[str, str, str], VersionMetrics] = {}
        self._http: dict[tuple[str, str, int | str], Any] = {}
        r = self.registry

        def counter(name: str, doc: str, labels: Iterable[str]) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labelnames=tuple(labels), registry=r)

        def histogram(
            name: str, doc: str, labels: Iterable[str], buckets: Iterable[float]
        ) -> Histogram:
            return Histogram(
                f"{PREFIX}_{name}",
                doc,
                labelnames=tuple(labels),
                buckets=tuple(buckets),
                registry=r,
            )

        def gauge(name: str, doc: str, labels: Iterable[str]) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, labelnames=tuple(labels), registry=r)

        build = gauge("build_info", "The modelyard release serving (always 1).", ["release"])
        build.labels(__version__).set(1)

        # -- requests ------------------------------------------------------------------------
        self.requests = counter(
            "requests", "Inference requests answered, by HTTP status.", [*BACKEND_LABELS, "status"]
        )
        self.request_duration = histogram(
            "request_duration_seconds",
            "Inference request duration as the client saw it (a stream until its last byte).",
            BACKEND_LABELS,
            REQUEST_BUCKETS,
        )
        self.http_requests = counter(
            "http_requests",
            "Every HTTP request, by route template and status.",
            ["method", "route", "status"],
        )
        # -- batching -------------------------------------------------------------------------
        self.queue_wait = histogram(
            "queue_wait_seconds",
            "Time a request waited in its version's batch queue.",
            MODEL_LABELS,
            QUEUE_BUCKETS,
        )
        self.batch_size = histogram(
            "batch_size", "Requests per backend call.", MODEL_LABELS, BATCH_BUCKETS
        )
        self.backend_call = histogram(
            "backend_call_duration_seconds",
            "Duration of one batched backend call.",
            BACKEND_LABELS,
            REQUEST_BUCKETS,
        )
        # -- generation -----------------------------------------------------------------------
        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Time from the start of a stream to its first text.",
            MODEL_LABELS,
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Time between consecutive streamed text chunks.",
            MODEL_LABELS,
            ITL_BUCKETS,
        )
        self.prompt_tokens = counter(
            "prompt_tokens", "Prompt (input) tokens processed.", MODEL_LABELS
        )
        self.generated_tokens = counter(
            "generated_tokens", "Tokens generated (completion tokens).", MODEL_LABELS
        )
        # -- model lifecycle ------------------------------------------------------------------
        self.load_duration = histogram(
            "model_load_duration_seconds",
            "Time to load a model version (source, load, health).",
            BACKEND_LABELS,
            LOAD_BUCKETS,
        )
        self.loads = counter(
            "model_loads", "Model version loads, by outcome (loaded, failed).", ["model", "outcome"]
        )
        self.evictions = counter(
            "model_evictions",
            "On-demand versions unloaded: idle past keep_alive_s, or to make room (budget).",
            ["model", "reason"],
        )
        self.load_wait = histogram(
            "model_load_wait_seconds",
            "Time a request waited for its on-demand model to load (coalesced waits included).",
            ["model"],
            LOAD_BUCKETS,
        )
        self.memory_budget = gauge(
            "memory_budget_bytes", "server.memory_budget_bytes (0: no limit).", []
        )
        self.max_loaded = gauge(
            "max_loaded_models", "server.max_loaded_models (0: no limit).", []
        )
        self.swaps = counter(
            "model_swaps", "Active-version swaps (canary promotions included).", ["model"]
        )
        self.rollbacks = counter(
            "model_rollbacks",
            "Returns to a previous version: manual or canary (automatic).",
            ["model", "reason"],
        )
        # -- cache (recorded by the cache layer through the methods below) --------------------
        self.cache_hits = counter("cache_hits", "Cache lookups answered by a tier.", ["tier"])
        self.cache_misses = counter(
            "cache_misses", "Cache lookups a tier could not answer.", ["tier"]
        )
        self.cache_size = gauge("cache_bytes", "Bytes held by a cache tier.", ["tier"])
        self.cache_dedup = gauge(
            "cache_dedup_ratio",
            "Bytes written by callers / bytes stored (1 = no saving).",
            ["tier"],
        )
        self.cache_coalesced = counter(
            "cache_coalesced_requests",
            "Requests that shared an identical in-flight request.",
            ["model"],
        )
        # -- security (recorded by the auth layer) --------------------------------------------
        self.auth_failures = counter(
            "auth_failures", "Requests refused authentication or authorisation.", ["reason"]
        )
        self.rate_limited = counter(
            "rate_limited_requests", "Requests refused by a rate limit.", ["model"]
        )
        # -- the shared store (Redis/Valkey: the redis cache tier, cluster-wide limits) -------
        self.shared_store_errors = counter(
            "shared_store_errors",
            "Shared-store operations that failed or were skipped while it was unreachable; "
            "the request went on (a cache miss, a skipped write, the local rate limiter).",
            ["store", "operation"],
        )

    # -- per version -----------------------------------------------------------------------

    def version(self, model: str, version: str, backend: str) -> VersionMetrics:
        """The bound children for one model version (created on first use, then reused)."""
        key = (model, version, backend)
        found = self._versions.get(key)
        if found is None:
            found = self._versions[key] = VersionMetrics(self, model, version, backend)
        return found

    def for_version(self, version: ModelVersion) -> VersionMetrics:
        return self.version(version.name, version.version, version.spec.backend.name)

    # -- events without a model version -----------------------------------------------------

    def http_request(self, method: str, route: str, status: int | str) -> None:
        key = (method, route, status)
        child = self._http.get(key)
        if child is None:  # routes and statuses are few: bind each combination once
            child = self._http[key] = self.http_requests.labels(method, route, str(status))
        child.inc()

    def memory_limits(self, budget_bytes: int | None, max_loaded: int | None) -> None:
        """Export the configured limits (an unlimited one stays 0)."""
        if budget_bytes is not None:
            self.memory_budget.set(budget_bytes)
        if max_loaded is not None:
            self.max_loaded.set(max_loaded)

    def model_swapped(self, model: str) -> None:
        self.swaps.labels(model).inc()

    def model_rolled_back(self, model: str, reason: str) -> None:
        """``reason``: ``manual`` (the admin API) or ``canary`` (its breaker or error rate)."""
        self.rollbacks.labels(model, reason).inc()

    def cache_lookup(self, tier: str, hit: bool) -> None:
        """One tier answered (``hit``) or not; a miss in memory then a hit on disk is two calls."""
        (self.cache_hits if hit else self.cache_misses).labels(tier).inc()

    def cache_bytes(self, tier: str, size: int) -> None:
        self.cache_size.labels(tier).set(size)

    def cache_dedup_ratio(self, tier: str, ratio: float) -> None:
        self.cache_dedup.labels(tier).set(ratio)

    def cache_coalesced_request(self, model: str = "") -> None:
        self.cache_coalesced.labels(model).inc()

    def sync_cache(self, stats: dict[str, Any]) -> None:
        """Bring the cache metrics up to the layer's own counters (``CacheLayer.stats()``).

        The layer counts per tier as it goes; a scrape turns the growth since the last scrape
        into counter increments, so the exported counters stay monotonic.
        """
        reaching = stats.get("hits", 0) + stats.get("misses", 0)
        store_errors: dict[tuple[str, str], int] = {}  # a shared tier's, by operation
        for tier in stats.get("tiers", []):
            inner = tier.get("inner") if isinstance(tier.get("inner"), dict) else tier
            name = str(inner.get("tier", tier.get("tier", "")))  # a dedup wrapper: its store
            hits = int(tier.get("hits", 0))
            self._advance(self.cache_hits, name, hits)
            self._advance(self.cache_misses, name, max(0, reaching - hits))
            reaching = max(0, reaching - hits)
            if "bytes" in inner:
                self.cache_size.labels(name).set(inner["bytes"])
            if "dedup_ratio" in tier:
                self.cache_dedup.labels(name).set(tier["dedup_ratio"])
            for operation, count in (inner.get("store_errors") or {}).items():
                key = (name, str(operation))
                store_errors[key] = store_errors.get(key, 0) + int(count)
        self._advance(self.cache_coalesced, "", int(stats.get("coalesced", 0)))
        for labels, total in store_errors.items():
            self._advance(self.shared_store_errors, labels, total)

    def _advance(self, counter: Any, label: str | tuple[str, ...], total: int) -> None:
        labels = (label,) if isinstance(label, str) else label
        key = (id(counter), labels)
        grow = total - self._synced.get(key, 0)
        if grow > 0:
            counter.labels(*labels).inc(grow)
            self._synced[key] = total

    def auth_failure(self, reason: str) -> None:
        """``reason`` is a short fixed word (missing, invalid, expired, forbidden), never input."""
        self.auth_failures.labels(reason).inc()

    def rate_limited_request(self, model: str = "") -> None:
        self.rate_limited.labels(model).inc()

    def shared_store_error(self, store: str, operation: str) -> None:
        """One operation on the shared store that degraded (``operation``: a fixed word)."""
        self.shared_store_errors.labels(store, operation).inc()

    # -- state read at scrape time ------------------------------------------------------------

    def watch(self, models: ModelRegistry, aliases: Mapping[str, FailoverChain]) -> None:
        """Export queues, breakers, versions and failovers on every scrape."""
        self.registry.register(StateCollector(models, aliases))

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The registry in the format ``accept`` asks for (Prometheus text or OpenMetrics)."""
        return exposition(self.registry, accept)


def exposition(registry: CollectorRegistry, accept: str | None = None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
