"""``LifecycleReporter``: where a version's life is told — the log, plugins and the event bus."""

from __future__ import annotations

import logging

from modelyard.core.canary import Canary
from modelyard.core.events import (
    BreakerChanged,
    CanaryChanged,
    EventBus,
    LoadProgress,
    VersionStateChanged,
)
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import ModelVersion, VersionState
from modelyard.core.views import version_view

__all__ = ["LifecycleReporter"]

# The service's logger: state lines keep the name log filters and dashboards already use.
log = logging.getLogger("modelyard.core.service")


class LifecycleReporter:
    """Tells state changes, load progress, breaker and canary changes to whoever listens."""

    def __init__(self, plugins: PluginHost, events: EventBus) -> None:
        self._plugins = plugins
        self._events = events
        self._progress_sent: dict[tuple[str, str], tuple[str, int]] = {}

    def state_changed(
        self, version: ModelVersion, old: VersionState | None, new: VersionState
    ) -> None:
        log.info(
            "model %s version %s: %s -> %s", version.name, version.version,
            old.value if old else "-", new.value,
            extra={"model": version.name, "version": version.version,
                   "old_state": old.value if old else None, "new_state": new.value},
        )
        self._plugins.model_version_state_changed(version_view(version), old, new)
        if old is None and version.breaker.on_transition is None:
            version.breaker.on_transition = (
                lambda _b, was, now: self._breaker_changed(version, was.value, now.value)
            )
        self._events.publish(VersionStateChanged(
            model=version.name, version=version.version, old=old.value if old else None,
            new=new.value, error=version.error if new == VersionState.FAILED else "",
        ))

    def load_progress(self, version: ModelVersion) -> None:
        # A download reports many small steps: one event per phase and whole percent.
        key, now = (version.name, version.version), (version.phase, int(version.progress))
        if self._progress_sent.get(key) == now:
            return
        self._progress_sent[key] = now
        self._events.publish(LoadProgress(
            model=version.name, version=version.version, percent=version.progress,
            phase=version.phase,
        ))

    def _breaker_changed(self, version: ModelVersion, old: str, new: str) -> None:
        self._events.publish(
            BreakerChanged(model=version.name, version=version.version, old=old, new=new)
        )

    def canary_changed(self, model: str, canary: Canary, action: str, reason: str) -> None:
        self._events.publish(CanaryChanged(
            model=model, action=action,  # type: ignore[arg-type]  # Canaries names them
            version=canary.target, percent=canary.percent, reason=reason,
        ))
