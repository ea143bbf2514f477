"""``Deployments``: which versions exist and which one serves — load, swap, rollback, canary.

It also runs the periodic health probes of serving versions (``HealthProber``), when on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import msgspec

from modelyard.core.backend import Backend
from modelyard.core.batching import Clock
from modelyard.core.canaries import Canaries
from modelyard.core.canary import Canary
from modelyard.core.errors import ConfigError, ConflictError, ModelNotFoundError
from modelyard.core.events import EventBus, ModelRolledBack, ModelSwapped
from modelyard.core.loader import ModelLoader
from modelyard.core.probes import HealthProber, Sleeper
from modelyard.core.registry import ModelEntry, ModelRegistry, ModelVersion, VersionState
from modelyard.core.safety import SwapSafety
from modelyard.core.settings import ModelSpec, ServerSettings, decode_settings, resolve_models
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import Task
from modelyard.core.views import ModelView, SafetyReport, version_view

__all__ = ["Deployments", "StateObserver"]

log = logging.getLogger(__name__)

StateObserver = Callable[[ModelVersion, VersionState | None, VersionState], None]


class Deployments:
    """Owns the versions of every model and every change to which of them is active."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        loader: ModelLoader,
        canaries: Canaries,
        *,
        backends: Mapping[str, type[Backend]],
        telemetry: Telemetry,
        clock: Clock,
        on_state: StateObserver,
        sleep: Sleeper = asyncio.sleep,
        events: EventBus | None = None,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._loader = loader
        self._canaries = canaries
        self._backends = backends
        self._telemetry = telemetry
        self._clock = clock
        self._on_state = on_state
        self._events = events if events is not None else EventBus()
        self._locks: dict[str, asyncio.Lock] = {}
        # Per model: previously active versions, newest last, for rollback.
        self._history: dict[str, list[str]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._sleep = sleep
        self._probing: asyncio.Task[None] | None = None
        self._safety = SwapSafety(settings, self._probe_timeout)

    # -- loading -------------------------------------------------------------------------

    def register(self, specs: list[ModelSpec]) -> None:
        """List every configured version: loading, or unloaded until asked for (on demand)."""
        for spec in specs:
            version = self._new_version(spec)
            self._registry.add(version)
            if spec.on_demand:
                version.phase = "unloaded"
            version.set_state(VersionState.UNLOADED if spec.on_demand else VersionState.LOADING)

    async def load_all(self, specs: list[ModelSpec]) -> None:
        """Load every startup version; on-demand ones wait for their first request."""
        # One at a time: loads compete for the same cores and memory anyway, and a
        # sequential order keeps progress output readable.
        for spec in specs:
            if spec.on_demand:
                continue
            version = self._registry.entry(spec.name).versions[spec.version]
            await self._load(version, activate=spec.active)

    async def load_on_demand(self, version: ModelVersion) -> None:
        """Load ``version`` unless it serves already; it becomes active when it is meant to be
        (the model's active version, or its configured one before any was active)."""
        async with self._lock(version.name):
            if version.serving:
                return
            active = self._registry.entry(version.name).active_version
            activate = active == version.version or (active is None and version.spec.active)
            await self._load(version, activate=activate)

    def busy(self, name: str) -> bool:
        """An operation (load, swap, unload) holds ``name``'s lock now."""
        return self._lock(name).locked()

    async def evict(self, version: ModelVersion, idle: Callable[[ModelVersion], bool]) -> bool:
        """Unload ``version`` if ``idle`` still says so under its model's lock; True if done."""
        if self.busy(version.name):
            return False
        # Acquiring a free lock does not suspend: nothing can start using the version
        # between the check below and release() taking it out of service.
        async with self._lock(version.name):
            if not idle(version):
                return False
            await self._loader.release(version)
        return True

    async def _load(self, version: ModelVersion, *, activate: bool, added: bool = False) -> None:
        warmup = self._warmup_timeout(version, added=added)
        if await self._loader.load(version, warmup_timeout_s=warmup) and activate:
            self._activate(version)

    def _warmup_timeout(self, version: ModelVersion, *, added: bool) -> float | None:
        """The warm-up probe's timeout when this load warms up, else None."""
        wanted = version.spec.probe.warmup
        if wanted is None:
            policy = self._settings.warmup
            wanted = policy == "all" or (policy == "added" and added)
        return self._probe_timeout(version) if wanted else None

    def _probe_timeout(self, version: ModelVersion) -> float:
        return version.spec.probe.timeout_s or self._settings.probe_timeout_s

    def _probe_interval(self, version: ModelVersion) -> float:
        own = version.spec.probe_interval_s
        return self._settings.probe_interval_s if own is None else own

    def _new_version(self, spec: ModelSpec) -> ModelVersion:
        return ModelVersion(spec, self._on_state, clock=self._clock)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _exclusive(self, name: str) -> asyncio.Lock:
        lock = self._lock(name)
        if lock.locked():
            raise ConflictError(f"another operation on {name!r} is in progress")
        return lock

    async def load_model(self, name: str) -> ModelEntry:
        """(Re)load every configured version of ``name`` that is not serving."""
        entry = self._registry.entry(name)
        async with self._lock(name):
            for version in list(entry.versions.values()):
                if version.serving:
                    continue
                activate = version.spec.active or entry.active_version in (None, version.version)
                await self._load(version, activate=activate)
        return entry

    async def unload_model(self, name: str) -> None:
        """Unload every version of ``name``; it stays listed and can be loaded again."""
        entry = self._registry.entry(name)
        async with self._lock(name):
            for version in list(entry.versions.values()):
                await self._loader.release(version)

    async def unload_version(self, name: str, version_label: str) -> None:
        """Unload and forget a non-active version, releasing its memory."""
        entry = self._registry.entry(name)
        if version_label not in entry.versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version_label!r}")
        if entry.active_version == version_label:
            raise ConflictError(f"version {version_label!r} of {name!r} is active; swap first")
        async with self._exclusive(name):
            await self._retire(entry.versions[version_label])
            self._registry.remove(name, version_label)
            history = self._history.get(name, [])
            if version_label in history:
                history.remove(version_label)

    async def release_all(self) -> None:
        for entry in list(self._registry):
            for version in list(entry.versions.values()):
                await self._loader.release(version)

    # -- new versions --------------------------------------------------------------------

    def add_version(
        self, name: str, version_label: str, source: str, *, backend: str | None = None,
        task: Task | None = None, options: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Register a new version and load it in the background (it does not become active)."""
        version = self.register_version(
            name, version_label, source, backend=backend, task=task, options=options
        )
        self._spawn(self._load_locked(version))
        return version

    def register_version(
        self, name: str, version_label: str, source: str, *, backend: str | None = None,
        task: Task | None = None, options: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Register a new version, loading (its load is the caller's to start)."""
        entry = self._registry.entry(name)
        existing = entry.versions.get(version_label)
        if existing is not None and existing.state not in (
            VersionState.FAILED, VersionState.UNLOADED
        ):
            raise ConflictError(f"model {name!r} already has version {version_label!r}")
        template = (entry.active or next(iter(entry.versions.values()))).spec
        spec = self._spec_like(template, version_label, source, backend, task, options)
        version = self._new_version(spec)
        self._registry.add(version)
        version.set_state(VersionState.LOADING)
        return version

    def _spec_like(
        self, template: ModelSpec, version_label: str, source: str, backend: str | None,
        task: Task | None, options: dict[str, Any] | None,
    ) -> ModelSpec:
        """A spec for a new version: the request's fields, the rest from ``template``."""
        backend_cls = self._backends.get(backend or template.backend.name)
        if backend_cls is None:
            installed = ", ".join(sorted(self._backends))
            raise ConfigError(f"$.backend: unknown backend {backend!r}; installed: {installed}")
        same_backend = backend_cls is template.backend
        raw = {
            "name": template.name, "version": version_label, "backend": backend_cls.name,
            "source": source, "task": (task or template.task),
            "options": options if options is not None else (
                msgspec.to_builtins(template.options) if same_backend else {}
            ),
            "required": False,
            "batching": msgspec.to_builtins(template.batching),
            "breaker": msgspec.to_builtins(template.breaker),
            # The model's probe is the request every version of it must answer.
            "probe": msgspec.to_builtins(template.probe),
            "probe_interval_s": template.probe_interval_s,
            "load": template.load,
            "keep_alive_s": template.keep_alive_s,
            "pinned": template.pinned,
        }
        try:
            settings = decode_settings({"models": [raw]}, env={})
            spec = resolve_models(settings, {backend_cls.name: backend_cls})[0]
        except ConfigError as exc:
            # Re-root the path at the request body rather than a config file.
            raise ConfigError(exc.detail.replace("$.models[0]", "$", 1)) from None
        return msgspec.structs.replace(spec, active=False, required=template.required)

    async def _load_locked(self, version: ModelVersion) -> None:
        async with self._lock(version.name):
            await self._load(version, activate=False, added=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- swap and rollback ---------------------------------------------------------------

    async def swap_safety(self, name: str, to: str) -> SafetyReport:
        """Whether ``to`` may become active now, check by check (a real probe among them)."""
        return await self._safety.report(
            self._registry.entry(name), to, busy=self._lock(name).locked()
        )

    async def swap(self, name: str, to: str) -> SafetyReport:
        """Make ``to`` active atomically; 409 with the safety report when unsafe."""
        report = await self.swap_safety(name, to)
        if not report.safe:
            raise ConflictError(
                f"swap of {name!r} to {to!r} is not safe",
                extra={"report": msgspec.to_builtins(report)},
            )
        async with self._lock(name):
            target = self._registry.entry(name).versions.get(to)
            if target is None or not target.serving:  # unloaded while the checks ran
                raise ConflictError(
                    f"version {to!r} of {name!r} stopped serving during the swap checks",
                    extra={"report": msgspec.to_builtins(report)},
                )
            self._activate(target)
            self._telemetry.swapped(name)
            self._events.publish(ModelSwapped(model=name, from_version=report.from_, to_version=to))
            await self._prune_deprecated(name)
        return report

    async def rollback(self, name: str) -> str:
        """Return to the previously active version (kept loaded as deprecated)."""
        entry = self._registry.entry(name)
        history = self._history.get(name, [])
        while history and not (
            history[-1] in entry.versions and entry.versions[history[-1]].serving
        ):
            history.pop()
        if not history:
            raise ConflictError(f"model {name!r} has no previous version to roll back to")
        async with self._exclusive(name):
            target = history.pop()
            previous = entry.active_version
            self._activate(entry.versions[target], remember=False)
            self._telemetry.rolled_back(name, "manual")
            self._events.publish(
                ModelRolledBack(model=name, from_version=previous, to_version=target)
            )
        return target

    def _activate(self, version: ModelVersion, *, remember: bool = True) -> None:
        entry = self._registry.entry(version.name)
        previous = entry.active
        # One synchronous assignment: requests admitted before it hold the old version and
        # finish there; every later lookup sees the new one.
        entry.active_version = version.version
        version.set_state(VersionState.ACTIVE)
        if previous is not None and previous is not version and previous.serving:
            previous.set_state(VersionState.DEPRECATED)
            if remember:
                self._history.setdefault(entry.name, []).append(previous.version)

    async def _prune_deprecated(self, name: str) -> None:
        history = self._history.get(name, [])
        while len(history) > self._settings.keep_deprecated:
            oldest = history.pop(0)
            version = self._registry.entry(name).versions.get(oldest)
            if version is not None and version.state == VersionState.DEPRECATED:
                await self._retire(version)

    async def _retire(self, version: ModelVersion) -> None:
        """Unload a version that takes no traffic of its own any more (not active), once the
        requests it admitted before the swap have their answers (``shutdown_grace_s`` at most):
        unloading it right after a swap must fail none of them."""
        if version.batcher is not None:
            await version.batcher.drain(self._settings.shutdown_grace_s)
        await self._loader.release(version)

    # -- following the cluster -----------------------------------------------------------

    async def ensure_serving(self, version: ModelVersion) -> bool:
        """Load ``version`` (not active) unless it serves already; True once it serves."""
        async with self._lock(version.name):
            if not version.serving:
                await self._load(version, activate=False, added=True)
        return version.serving

    async def follow_active(self, name: str, to: str) -> None:
        """Make ``to`` active because the cluster did (its checks ran where it was swapped)."""
        async with self._lock(name):
            entry = self._registry.entry(name)
            target = entry.versions.get(to)
            if target is None or not target.serving or entry.active_version == to:
                return
            previous = entry.active_version
            self._activate(target)
            self._events.publish(ModelSwapped(model=name, from_version=previous, to_version=to))

    async def retire_version(self, name: str, version_label: str) -> None:
        """Take a non-active version out of service once its admitted requests are answered."""
        async with self._lock(name):
            entry = self._registry.entry(name)
            version = entry.versions.get(version_label)
            if version is not None and entry.active_version != version_label:
                await self._retire(version)

    # -- canary --------------------------------------------------------------------------

    def start_canary(self, name: str, to: str, percent: float) -> Canary:
        """Send ``percent`` of ``name``'s traffic to version ``to`` (ready, not active)."""
        entry = self._registry.entry(name)
        target = entry.versions.get(to)
        if target is None:
            raise ModelNotFoundError(f"model {name!r} has no version {to!r}")
        if not target.serving or entry.active_version == to:
            raise ConflictError(f"version {to!r} of {name!r} must be ready and not active")
        return self._canaries.start(name, to, percent)

    def stop_canary(self, name: str) -> None:
        self._canaries.stop(name)

    async def promote_canary(self, name: str) -> SafetyReport:
        """Make the canary the active version (a swap, with its safety checks)."""
        canary = self._canaries.get(name)
        if canary is None:
            raise ConflictError(f"model {name!r} has no canary")
        report = await self.swap(name, canary.target)
        if self._canaries.get(name) is canary:
            self._canaries.stop(name)
        return report

    def traffic(self, name: str) -> dict[str, float]:
        return self._canaries.traffic(self._registry.entry(name))

    # -- periodic health probes -----------------------------------------------------------

    def start_probes(self) -> None:
        """Start probing serving versions when any model has an interval (off by default)."""
        versions = [v for e in self._registry for v in e.versions.values()]
        intervals = [i for i in map(self._probe_interval, versions) if i > 0]
        if not intervals or self._probing is not None:
            return
        prober = HealthProber(
            lambda: [v for e in self._registry for v in e.versions.values()],
            interval_of=self._probe_interval, timeout_of=self._probe_timeout,
            idle_s=min(intervals), clock=self._clock, sleep=self._sleep,
            after_probe=self._canaries.roll_back_if_open,
        )
        self._probing = asyncio.get_running_loop().create_task(
            prober.run(), name="modelyard-health-probes"
        )

    async def stop_probes(self) -> None:
        task, self._probing = self._probing, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    # -- views ---------------------------------------------------------------------------

    def model_view(self, entry: ModelEntry) -> ModelView:
        canary = self._canaries.get(entry.name)
        return ModelView(
            name=entry.name,
            active_version=entry.active_version,
            required=entry.required,
            versions=[version_view(v) for v in entry.versions.values()],
            traffic=self._canaries.traffic(entry),
            canary=canary.snapshot() if canary is not None else None,
            last_canary_rollback=self._canaries.rollbacks.get(entry.name),
        )
