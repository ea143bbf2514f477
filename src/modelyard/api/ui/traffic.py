"""Requests per second and latency percentiles, from the server's own Prometheus metrics.

The console's numbers are the ones ``GET /metrics`` exposes: the
``modelyard_requests_total`` counter (by model, version and status) and the
``modelyard_request_duration_seconds`` histogram. Counters only grow, so a rate or a
percentile needs two readings: :class:`TrafficWindow` keeps a bounded history of readings
(one every ``interval_s``, taken by the console's sampler or on demand) and answers from the
difference between them, as Prometheus' ``rate()`` and ``histogram_quantile()`` would.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from msgspec import Struct

from modelyard.core.metrics import Metrics

__all__ = ["ModelTraffic", "TrafficPoint", "TrafficWindow", "quantile"]


class ModelTraffic(Struct, frozen=True, kw_only=True):
    """One model's traffic over the last ``window_s`` seconds (None: no reading to compare)."""

    model: str
    requests_per_s: float | None
    #: Answered with a 5xx status (a server or model fault), per second.
    errors_per_s: float | None
    #: Latency percentiles of the requests answered in the window, in milliseconds.
    p50_ms: float | None
    p99_ms: float | None
    #: Requests per second by version (a canary's share shows here).
    versions: dict[str, float] = {}
    #: Requests answered in the window, by HTTP status.
    statuses: dict[str, int] = {}


class TrafficPoint(Struct, frozen=True, kw_only=True, array_like=True):
    """One step of a model's history: ``[at, requests_per_s, p50_ms, p99_ms, errors_per_s]``."""

    at: float
    requests_per_s: float
    p50_ms: float | None
    p99_ms: float | None
    errors_per_s: float


@dataclass
class _Counts:
    """Cumulative counts of one model at one reading."""

    statuses: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    versions: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    #: Cumulative histogram buckets: upper bound (seconds, ``inf`` last) -> count.
    buckets: dict[float, float] = field(default_factory=lambda: collections.defaultdict(float))


@dataclass(frozen=True)
class _Reading:
    at: float  # monotonic seconds, for rates
    wall: float  # seconds since the epoch, for charts
    models: dict[str, _Counts]


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The ``q`` quantile of a cumulative histogram, interpolated within its bucket.

    ``buckets`` are ``(upper bound, cumulative count)`` in increasing order, ``inf`` last
    (Prometheus' ``histogram_quantile``). None when the histogram is empty; a rank in the
    ``+Inf`` bucket answers the highest finite bound.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


def _read(metrics: Metrics) -> dict[str, _Counts]:
    found: dict[str, _Counts] = collections.defaultdict(_Counts)
    for family in metrics.requests.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts = found[sample.labels["model"]]
                counts.statuses[sample.labels["status"]] += sample.value
                counts.versions[sample.labels["version"]] += sample.value
    for family in metrics.request_duration.collect():
        for sample in family.samples:
            if sample.name.endswith("_bucket"):
                found[sample.labels["model"]].buckets[float(sample.labels["le"])] += sample.value
    return dict(found)


_K = TypeVar("_K", str, float)


def _grown(new: dict[_K, float], old: dict[_K, float]) -> dict[_K, float]:
    before = old
    return {key: max(0.0, value - before.get(key, 0.0)) for key, value in new.items()}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def _server_errors(statuses: dict[str, float]) -> float:
    return sum(n for status, n in statuses.items() if status.isdigit() and int(status) >= 500)


class TrafficWindow:
    """A bounded history of metric readings; rates and percentiles between two of them."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        interval_s: float = 2.0,
        history_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._metrics = metrics
        self.interval_s = interval_s
        self.history_s = history_s
        self._clock = clock
        self._wall = wall
        self._readings: collections.deque[_Reading] = collections.deque(
            maxlen=max(2, math.ceil(history_s / interval_s) + 1)
        )

    def sample(self) -> None:
        """Take a reading now (the sampler calls this every ``interval_s``)."""
        self._readings.append(_Reading(self._clock(), self._wall(), _read(self._metrics)))

    def due(self) -> bool:
        """Whether the last reading is ``interval_s`` old (or there is none)."""
        return not self._readings or self._clock() - self._readings[-1].at >= self.interval_s

    @property
    def last_wall(self) -> float:
        """Wall-clock time of the newest reading (0 before the first)."""
        return self._readings[-1].wall if self._readings else 0.0

    def _since(self, seconds: float) -> _Reading | None:
        """The oldest reading within ``seconds`` of the newest (not the newest itself)."""
        if len(self._readings) < 2:
            return None
        newest = self._readings[-1]
        for reading in self._readings:
            if reading is newest:
                return None
            if newest.at - reading.at <= seconds + 1e-9:
                return reading
        return None

    def summary(self, models: Iterable[str], window_s: float = 30.0) -> list[ModelTraffic]:
        """Each model's traffic over the last ``window_s`` seconds of readings."""
        start = self._since(window_s)
        newest = self._readings[-1] if self._readings else None
        return [self._traffic(name, start, newest) for name in models]

    def _traffic(
        self, name: str, start: _Reading | None, newest: _Reading | None
    ) -> ModelTraffic:
        if start is None or newest is None:
            return ModelTraffic(model=name, requests_per_s=None, errors_per_s=None,
                                p50_ms=None, p99_ms=None)
        now = newest.models.get(name, _Counts())
        then = start.models.get(name, _Counts())
        seconds = newest.at - start.at
        statuses = _grown(now.statuses, then.statuses)
        buckets = _grown(now.buckets, then.buckets)
        return ModelTraffic(
            model=name,
            requests_per_s=round(sum(statuses.values()) / seconds, 3),
            errors_per_s=round(_server_errors(statuses) / seconds, 3),
            p50_ms=_ms(quantile(0.5, buckets.items())),
            p99_ms=_ms(quantile(0.99, buckets.items())),
            versions={v: round(n / seconds, 3)
                      for v, n in _grown(now.versions, then.versions).items()},
            statuses={s: int(n) for s, n in sorted(statuses.items()) if n},
        )

    def series(self, model: str, span_s: float = 300.0) -> list[TrafficPoint]:
        """One point per reading over the last ``span_s`` seconds: the step since the one
        before it."""
        readings = list(self._readings)
        if not readings:
            return []
        cutoff = readings[-1].at - span_s
        points = []
        for before, after in zip(readings, readings[1:], strict=False):
            if after.at <= cutoff or after.at <= before.at:
                continue
            now = after.models.get(model, _Counts())
            then = before.models.get(model, _Counts())
            seconds = after.at - before.at
            statuses = _grown(now.statuses, then.statuses)
            buckets = _grown(now.buckets, then.buckets)
            points.append(TrafficPoint(
                at=round(after.wall, 3),
                requests_per_s=round(sum(statuses.values()) / seconds, 3),
                p50_ms=_ms(quantile(0.5, buckets.items())),
                p99_ms=_ms(quantile(0.99, buckets.items())),
                errors_per_s=round(_server_errors(statuses) / seconds, 3),
            ))
        return points
