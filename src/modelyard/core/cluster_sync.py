"""``RoutingSync``: a model's routing read from this server, and the cluster's applied to it."""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from modelyard.core.canaries import Canaries
from modelyard.core.cluster import ModelRouting, RoutedVersion
from modelyard.core.deployments import Deployments
from modelyard.core.errors import ModelyardError
from modelyard.core.registry import ModelRegistry, ModelVersion, VersionState
from modelyard.core.settings import ModelSpec
from modelyard.core.types import Task

__all__ = ["RoutingSync", "entry_of"]

log = logging.getLogger(__name__)


def entry_of(spec: ModelSpec) -> dict[str, Any]:
    """What another server needs to build the same version: the config entry's own fields."""
    return {
        "backend": spec.backend.name,
        "source": spec.source,
        "task": spec.task.value if spec.task is not None else None,
        "options": msgspec.to_builtins(spec.options),
    }


class RoutingSync:
    """Reads and applies ``ModelRouting`` through the deployments' own operations."""

    def __init__(
        self, registry: ModelRegistry, deployments: Deployments, canaries: Canaries
    ) -> None:
        self._registry = registry
        self._deployments = deployments
        self._canaries = canaries

    def routing(self, name: str) -> ModelRouting:
        """This server's routing of ``name`` as the cluster should know it."""
        entry = self._registry.entry(name)
        canary = self._canaries.get(name)
        return ModelRouting(
            versions={
                label: RoutedVersion(entry=entry_of(v.spec), serving=_wanted(v))
                for label, v in entry.versions.items()
            },
            active=entry.active_version,
            canary=(canary.target, canary.percent) if canary is not None else None,
        )

    async def apply(self, name: str, routing: ModelRouting) -> None:
        """Load what serves there, switch the active version, match the canary, retire the
        rest; a version this server cannot load keeps its failed state and the old one serves.
        """
        if name not in self._registry:
            log.warning("the cluster routes model %r, which this server's config lacks", name)
            return
        entry = self._registry.entry(name)
        for label, routed in routing.versions.items():
            if routed.serving:
                version = entry.versions.get(label) or self._add(name, label, routed)
                await self._deployments.ensure_serving(version)
        if routing.active is not None:
            await self._deployments.follow_active(name, routing.active)
        self._match_canary(name, routing.canary)
        for label, version in list(entry.versions.items()):
            routed_version = routing.versions.get(label)
            # Not serving there, or forgotten there (unloaded and removed): not here either.
            if version.serving and (routed_version is None or not routed_version.serving):
                await self._deployments.retire_version(name, label)

    def _add(self, name: str, label: str, routed: RoutedVersion) -> ModelVersion:
        e = routed.entry
        task = e.get("task")
        return self._deployments.register_version(
            name, label, e["source"], backend=e.get("backend"),
            task=Task(task) if task else None, options=e.get("options"),
        )

    def _match_canary(self, name: str, canary: tuple[str, float] | None) -> None:
        current = self._canaries.get(name)
        if canary is None:
            if current is not None:
                self._deployments.stop_canary(name)
            return
        target, percent = canary
        if current is not None and (current.target, current.percent) == (target, percent):
            return
        try:
            self._deployments.start_canary(name, target, percent)
        except ModelyardError as exc:
            log.warning("cannot follow the cluster's canary of %s: %s", name, exc.detail)


def _wanted(version: ModelVersion) -> bool:
    """Serving here, or on its way to serving: other servers should load it too."""
    return version.serving or version.state == VersionState.LOADING
