"""``Canaries``: the running canary of each model, judged on every answer it gives."""

from __future__ import annotations

import logging
from collections.abc import Callable

from modelyard.core.breaker import CircuitState
from modelyard.core.canary import Canary
from modelyard.core.errors import ConflictError
from modelyard.core.registry import ModelEntry, ModelVersion
from modelyard.core.settings import ServerSettings
from modelyard.core.telemetry import Telemetry

__all__ = ["Canaries"]

log = logging.getLogger(__name__)


class Canaries:
    """At most one canary per model; rolled back by itself on errors or an open breaker."""

    def __init__(self, settings: ServerSettings, telemetry: Telemetry) -> None:
        self._settings = settings
        self._telemetry = telemetry
        self._running: dict[str, Canary] = {}
        #: Why each model's last canary was rolled back automatically.
        self.rollbacks: dict[str, str] = {}
        #: Told ``(model, canary, action, reason)`` on start, stop and automatic rollback.
        self.on_change: Callable[[str, Canary, str, str], None] | None = None

    def get(self, model: str) -> Canary | None:
        return self._running.get(model)

    def start(self, model: str, target: str, percent: float) -> Canary:
        canary = Canary(target, percent, min_calls=self._settings.canary_min_calls,
                        error_margin=self._settings.canary_error_margin)
        self._running[model] = canary
        self.rollbacks.pop(model, None)
        log.info("canary: %s version %s takes %g%% of traffic", model, target, percent)
        self._changed(model, canary, "started")
        return canary

    def stop(self, model: str, *, reason: str = "") -> Canary:
        """End ``model``'s canary; a ``reason`` marks it an automatic rollback."""
        canary = self._running.pop(model, None)
        if canary is None:
            raise ConflictError(f"model {model!r} has no canary")
        if reason:
            self._telemetry.rolled_back(model, "canary")
            self.rollbacks[model] = reason
            log.warning("canary of %s version %s rolled back: %s", model, canary.target, reason)
        self._changed(model, canary, "rolled_back" if reason else "stopped", reason)
        return canary

    def _changed(self, model: str, canary: Canary, action: str, reason: str = "") -> None:
        if self.on_change is not None:
            self.on_change(model, canary, action, reason)

    def record(self, version: ModelVersion, active_version: str | None, *, failed: bool) -> None:
        """Count one answer of ``version``; roll the canary back once it does worse."""
        canary = self._running.get(version.name)
        if canary is None:
            return
        canary.record(version.version, failed=failed)
        reason = canary.rollback_reason(active_version)
        if reason:
            self.stop(version.name, reason=reason)

    def roll_back_if_open(self, version: ModelVersion) -> bool:
        """A canary whose circuit breaker opened is rolled back at once; True if it was."""
        canary = self._running.get(version.name)
        if canary is None or canary.target != version.version:
            return False
        if version.breaker.state != CircuitState.OPEN:
            return False
        self.stop(version.name, reason="the canary's circuit breaker opened")
        return True

    def traffic(self, entry: ModelEntry) -> dict[str, float]:
        """Share of new requests (percent) each version of ``entry`` receives."""
        shares: dict[str, float] = {}
        if entry.active_version is None:
            return shares
        shares[entry.active_version] = 100.0
        canary = self._running.get(entry.name)
        if canary is not None:
            shares[entry.active_version] = 100.0 - canary.percent
            shares[canary.target] = canary.percent
        return shares
