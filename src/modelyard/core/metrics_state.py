"""Scrape-time state for the metrics: queue depths, breakers, version states, failovers.

Read from the registry and the alias chains when Prometheus scrapes, so it costs nothing
between scrapes and can never drift from the truth.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modelyard.core.breaker import CircuitState
from modelyard.core.registry import VersionState

if TYPE_CHECKING:
    from modelyard.core.failover import FailoverChain
    from modelyard.core.registry import ModelRegistry, ModelVersion

__all__ = ["BACKEND_LABELS", "MODEL_LABELS", "PREFIX", "StateCollector"]

#: Shared with core/metrics.py: every metric name starts with it.
PREFIX = "modelyard"
MODEL_LABELS = ("model", "version")
BACKEND_LABELS = ("model", "version", "backend")


class StateCollector(Collector):
    """Reads queue depths, breaker and version states and failover counts at scrape time."""

    def __init__(self, models: ModelRegistry, aliases: Mapping[str, FailoverChain]) -> None:
        self._models = models
        self._aliases = aliases

    def describe(self) -> Iterator[Any]:
        # Empty families: the registry learns the names without collecting the service.
        return iter(self._families())

    def collect(self) -> Iterator[Any]:
        families = self._families()
        depth, state, version_state, progress, transitions, failovers, exhausted, stuck = (
            families[:8]
        )
        memory, used, loaded, in_flight = families[8:]
        held = count = 0
        for entry in self._models:
            for v in entry.versions.values():
                _version_samples(v, depth, state, version_state, progress, transitions)
                if v.batcher is not None:
                    stuck.add_metric([v.name, v.version], v.batcher.stuck_calls)
                if v.backend is not None:
                    memory.add_metric([v.name, v.version], v.held_bytes)
                    in_flight.add_metric([v.name, v.version], v.in_flight)
                    held, count = held + v.held_bytes, count + 1
        used.add_metric([], held)
        loaded.add_metric([], count)
        for chain in self._aliases.values():
            failovers.add_metric([chain.name], chain.failovers)
            exhausted.add_metric([chain.name], chain.exhausted)
        return iter(families)

    @staticmethod
    def _families() -> list[Any]:
        return [
            GaugeMetricFamily(
                f"{PREFIX}_queue_depth",
                "Requests waiting in a version's batch queue.",
                labels=MODEL_LABELS,
            ),
            GaugeMetricFamily(
                f"{PREFIX}_circuit_breaker_state",
                "1 for the breaker's current state, 0 for the others.",
                labels=[*MODEL_LABELS, "state"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_model_version_state",
                "1 for the version's current state, 0 for the others.",
                labels=[*BACKEND_LABELS, "state"],
            ),
            GaugeMetricFamily(
                f"{PREFIX}_model_load_progress_ratio",
                "Load progress of a version, 0 to 1.",
                labels=MODEL_LABELS,
            ),
            CounterMetricFamily(
                f"{PREFIX}_circuit_breaker_transitions",
                "Breaker state changes.",
                labels=[*MODEL_LABELS, "from_state", "to_state"],
            ),
            CounterMetricFamily(
                f"{PREFIX}_failovers",
                "Times a request to an alias moved on to its next target.",
                labels=["alias"],
            ),
            CounterMetricFamily(
                f"{PREFIX}_failover_exhausted",
                "Alias requests no target could answer (503).",
                labels=["alias"],
            ),
            CounterMetricFamily(
                f"{PREFIX}_stuck_backend_calls",
                "Backend calls still running after they were cancelled (version unhealthy).",
                labels=MODEL_LABELS,
            ),
            GaugeMetricFamily(
                f"{PREFIX}_model_memory_bytes",
                "Memory a loaded version holds, as its backend reports it.",
                labels=MODEL_LABELS,
            ),
            GaugeMetricFamily(
                f"{PREFIX}_memory_used_bytes", "Memory all loaded versions hold.", labels=[]
            ),
            GaugeMetricFamily(f"{PREFIX}_loaded_models", "Versions loaded now.", labels=[]),
            GaugeMetricFamily(
                f"{PREFIX}_requests_in_flight",
                "Requests a loaded version is serving now.",
                labels=MODEL_LABELS,
            ),
        ]


def _version_samples(
    v: ModelVersion,
    depth: GaugeMetricFamily,
    state: GaugeMetricFamily,
    version_state: GaugeMetricFamily,
    progress: GaugeMetricFamily,
    transitions: CounterMetricFamily,
) -> None:
    mv = [v.name, v.version]
    if v.batcher is not None:
        depth.add_metric(mv, v.batcher.depth)
    current = v.breaker.state  # applies time-driven transitions, as any reader does
    for breaker_state in CircuitState:
        state.add_metric([*mv, breaker_state.value], 1.0 if breaker_state is current else 0.0)
    for lifecycle in VersionState:
        version_state.add_metric(
            [*mv, v.spec.backend.name, lifecycle.value], 1.0 if v.state is lifecycle else 0.0
        )
    progress.add_metric(mv, v.progress / 100.0)
    for (old, new), count in sorted(v.breaker.transitions.items()):
        transitions.add_metric([*mv, old.value, new.value], count)
