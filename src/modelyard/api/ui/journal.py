"""Recent errors per model, for the console's model page: what went wrong lately, in words.

A load that failed (with its error), a circuit breaker that opened (with its reason), a canary
rolled back by itself (with its reason). The journal compares each reading of the models'
views (``InferenceService.model_views()``, taken with every traffic reading) with the one
before, so it needs no subscription of its own and sees what happened between two readings
too (a breaker's transition count grows even when it has closed again). It keeps the last
``per_model`` incidents of each model in memory; a restart forgets them (the audit log, the
access log and the metrics keep history).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass

from msgspec import Struct

from modelyard.core.views import ModelView, VersionView

__all__ = ["Incident", "Journal"]


class Incident(Struct, frozen=True, kw_only=True):
    """Something that went wrong with a model version."""

    #: Seconds since the epoch: the reading that first saw it.
    at: float
    #: ``load.failed``, ``breaker.open`` or ``canary.rolled_back``.
    kind: str
    version: str
    detail: str


@dataclass(frozen=True)
class _Seen:
    """What a reading showed of one version."""

    state: str | None
    error: str | None
    breaker: str
    transitions: int


def _seen(version: VersionView) -> _Seen:
    breaker = version.breaker
    return _Seen(version.state, version.error, str(breaker.get("state", "closed")),
                 int(breaker.get("transitions", 0)))


#: The fewest transitions from one breaker state to another (closed -> open -> half_open ->
#: closed, half_open -> open), and whether that shortest way passes an opening. Every cycle
#: in that graph passes "open": more transitions than the fewest mean it opened as well.
_PATHS: dict[tuple[str, str], tuple[int, bool]] = {
    ("closed", "closed"): (0, False), ("closed", "open"): (1, True),
    ("closed", "half_open"): (2, True), ("open", "open"): (0, False),
    ("open", "half_open"): (1, False), ("open", "closed"): (2, False),
    ("half_open", "half_open"): (0, False), ("half_open", "open"): (1, True),
    ("half_open", "closed"): (1, False),
}


def _breaker_opened(before: _Seen | None, now: _Seen) -> bool:
    """Whether the breaker opened (or reopened) since the reading before."""
    if before is None:
        return now.breaker != "closed"
    fewest, opens = _PATHS.get((before.breaker, now.breaker), (0, False))
    return opens or now.transitions - before.transitions > fewest


class Journal:
    """The last ``per_model`` incidents of each model, newest first."""

    def __init__(self, per_model: int = 20) -> None:
        self.per_model = per_model
        self._incidents: dict[str, collections.deque[Incident]] = {}
        self._versions: dict[tuple[str, str], _Seen] = {}
        self._rollbacks: dict[str, str | None] = {}
        self._canaries: dict[str, str | None] = {}

    def observe(self, models: Iterable[ModelView], at: float) -> None:
        """Record what changed for the worse since the last reading."""
        for model in models:
            for version in model.versions:
                self._version(model.name, version, at)
            self._canary(model, at)

    def _version(self, model: str, version: VersionView, at: float) -> None:
        key = (model, version.version)
        before, now = self._versions.get(key), _seen(version)
        self._versions[key] = now
        if now.state == "failed" and (before is None or before.state != "failed"
                                      or before.error != now.error):
            self._add(model, Incident(at=at, kind="load.failed", version=version.version,
                                      detail=now.error or "the version failed"))
        if _breaker_opened(before, now):
            reason = version.breaker.get("reason") or "too many failed or slow calls"
            self._add(model, Incident(
                at=at, kind="breaker.open", version=version.version,
                detail=f"circuit breaker opened ({reason}): requests get 503 until it "
                       "recovers"))

    def _canary(self, model: ModelView, at: float) -> None:
        before = self._rollbacks.get(model.name)
        target = self._canaries.get(model.name)
        self._rollbacks[model.name] = model.last_canary_rollback
        self._canaries[model.name] = model.canary.target if model.canary else target
        if model.last_canary_rollback and model.last_canary_rollback != before:
            self._add(model.name, Incident(
                at=at, kind="canary.rolled_back", version=target or "",
                detail=f"canary rolled back: {model.last_canary_rollback}"))

    def _add(self, model: str, incident: Incident) -> None:
        kept = self._incidents.setdefault(model, collections.deque(maxlen=self.per_model))
        kept.appendleft(incident)

    def recent(self, model: str) -> list[Incident]:
        return list(self._incidents.get(model, ()))
