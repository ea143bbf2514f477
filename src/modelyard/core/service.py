"""``InferenceService``: the small facade every protocol (OpenAI, v2, admin) talks to.

It wires the parts and answers the HTTP layer's questions; each part has one job:
``ModelLoader`` (source → serving backend), ``Deployments`` (versions, swap, rollback,
canary), ``Router`` (aliases, canary share, task match) and ``InferencePipeline``
(limits → cache → breaker → batcher → backend). See docs/architecture.md.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from modelyard._version import __version__
from modelyard.core.auth import Principal
from modelyard.core.backend import BackendInfo
from modelyard.core.batching import Clock
from modelyard.core.canaries import Canaries
from modelyard.core.canary import Canary
from modelyard.core.cluster import ClusterLink
from modelyard.core.cluster_sync import RoutingSync
from modelyard.core.context import ServerContext
from modelyard.core.deployments import Deployments
from modelyard.core.errors import (
    ConfigError,
    ConflictError,
    ModelNotFoundError,
    ModelNotReadyError,
)
from modelyard.core.events import (
    EventBus,
)
from modelyard.core.failover import build_chains
from modelyard.core.lifecycle import LifecycleReporter
from modelyard.core.loader import ModelLoader, ResolveSource
from modelyard.core.pipeline import Answer, InferencePipeline, StreamAnswer
from modelyard.core.plugins import PluginHost, PluginRecord
from modelyard.core.probes import Sleeper
from modelyard.core.registry import ModelRegistry, ModelVersion, VersionState
from modelyard.core.residency import Residency
from modelyard.core.response_cache import CacheDirective, ResponseCache
from modelyard.core.routing import Router
from modelyard.core.settings import ModelSpec, Settings, cache_dir_of, resolve_models
from modelyard.core.sources import SourceResolver
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import InferenceRequest, Task
from modelyard.core.views import (
    IndexRow,
    ModelCard,
    ModelMetadata,
    ModelView,
    Overview,
    Readiness,
    SafetyReport,
    VersionView,
    index_rows,
    model_cards,
    version_view,
)

__all__ = ["Answer", "InferenceService", "StreamAnswer"]

log = logging.getLogger(__name__)



class InferenceService:
    """One server's models: loads them, routes requests to them, and reports on them."""

    def __init__(
        self,
        settings: Settings,
        plugins: PluginHost,
        *,
        clock: Clock = time.monotonic,
        source_resolver: ResolveSource | None = None,
        telemetry: Telemetry | None = None,
        sleep: Sleeper = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self._plugins = plugins
        self._clock = clock
        self._registry = ModelRegistry()
        self._specs: list[ModelSpec] = resolve_models(
            settings, plugins.backends, unavailable=plugins.unavailable()
        )
        versions: dict[str, list[str]] = {}
        for spec in self._specs:
            versions.setdefault(spec.name, []).append(spec.version)
        #: Metrics, tracing and request context; one per service, so apps never share them.
        self.telemetry = telemetry if telemetry is not None else Telemetry(
            log_prompts=settings.server.log_prompts
        )
        self._cache: ResponseCache | None = None
        self._draining = False
        self._loading: asyncio.Task[None] | None = None
        self.started_at = 0.0
        self.started_wall = time.time()
        #: Typed server events (states, load progress, swaps, canaries, breakers, batches).
        self.events = EventBus()
        canaries = Canaries(settings.server, self.telemetry)
        self._reporter = LifecycleReporter(plugins, self.events)
        canaries.on_change = self._reporter.canary_changed
        self._router = Router(
            self._registry, build_chains(settings.aliases, versions), canaries
        )
        cluster = plugins.open_cluster(settings) if settings.cluster.engine != "local" else None
        if settings.cluster.engine != "local" and cluster is None:
            raise ConfigError(
                f"$.cluster.engine: no plugin provides {settings.cluster.engine!r}; "
                f"install modelyard[{settings.cluster.engine}]"
            )
        if cluster is None:
            _warn_placement_ignored(self._specs)
        loader = ModelLoader(
            resolve_source=source_resolver or SourceResolver(plugins.source_schemes),
            cache_dir=self.cache_dir, telemetry=self.telemetry, clock=clock,
            response_cache=lambda: self._cache, on_progress=self._reporter.load_progress,
            cluster=cluster,
        )
        self._deployments = Deployments(
            settings.server, self._registry, loader, canaries, backends=plugins.backends,
            telemetry=self.telemetry, clock=clock, on_state=self._reporter.state_changed,
            sleep=sleep, events=self.events,
        )
        self._sync = RoutingSync(self._registry, self._deployments, canaries)
        #: With a cluster: this server's routing changes go out, the others' come in.
        self._link = ClusterLink(
            cluster, self._sync.apply, retry_s=settings.cluster.sync_interval_s
        ) if cluster is not None else None
        self._publishing: set[asyncio.Task[None]] = set()
        self._residency = Residency(
            settings.server, self._registry, self._deployments, self.telemetry,
            on_demand=frozenset(s.name for s in self._specs if s.on_demand), clock=clock,
            sleep=sleep,
        )
        self._router.residency = self._residency
        self._pipeline = InferencePipeline(
            settings, self._registry, self._router, canaries, self.telemetry,
            response_cache=lambda: self._cache,
        )
        self.telemetry.watch(self._registry, self._router.aliases)
        self._context = ServerContext(
            settings, version=__version__, cache_dir=self.cache_dir,
            models=self.model_views, plugins=lambda: self._plugins.records,
        )

    @property
    def cache_dir(self) -> Path:
        return cache_dir_of(self.settings)

    @property
    def registry(self) -> ModelRegistry:
        """The live registry, for reading (tests, metrics); change it only through the service."""
        return self._registry

    @property
    def cache(self) -> ResponseCache | None:
        """The response cache, or None when ``[cache]`` is off."""
        return self._cache

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Announce startup and begin loading every configured version in the background."""
        self.started_at = self._clock()
        if self._link is not None:
            await self._link.cluster.start()
        self._cache = await self._open_cache()
        self._plugins.server_startup(self._context)
        self._deployments.register(self._specs)
        self._deployments.start_probes()
        self._residency.start()
        self._loading = asyncio.get_running_loop().create_task(self._load_and_join())

    async def _load_and_join(self) -> None:
        await self._deployments.load_all(self._specs)
        if self._link is not None:
            names = {spec.name for spec in self._specs}
            await self._link.join({name: self._sync.routing(name) for name in names})

    async def wait_until_loaded(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)

    def drain(self) -> bool:
        """Stop taking traffic (readiness turns 503); True the first time it is called."""
        first, self._draining = not self._draining, True
        return first

    @property
    def draining(self) -> bool:
        return self._draining

    async def stop(self) -> None:
        """Drain, stop loading, tell plugins, and unload every version."""
        self.drain()
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            try:
                await self._loading
            except asyncio.CancelledError:
                pass
        self._plugins.server_shutdown(self._context)
        if self._link is not None:
            await self._link.stop()
        await self._deployments.stop_probes()
        await self._residency.stop()
        await self._deployments.release_all()
        if self._link is not None:
            await self._link.cluster.stop()
        if self._cache is not None:
            await self._cache.close()
        self.events.close()

    async def _open_cache(self) -> ResponseCache | None:
        if not self.settings.cache.enabled:
            return None
        # Opens files (secret, SQLite): off the event loop.
        cache = await asyncio.to_thread(
            self._plugins.open_response_cache, self.settings.cache, self.cache_dir
        )
        if cache is None:
            raise ConfigError("$.cache: install modelyard[cache] (no plugin provides the cache)")
        return cache

    # -- status --------------------------------------------------------------------------

    def readiness(self) -> Readiness:
        """Ready when every required model has a serving active version (in a cluster: with a
        healthy replica) and we are not draining."""
        cluster = self._link.cluster if self._link is not None else None
        waiting = [
            entry.name for entry in self._registry
            if entry.required and (
                entry.active is None or not entry.active.serving or (
                    cluster is not None
                    and not cluster.replicas_ready(entry.name, entry.active.version)
                )
            )
        ]
        return Readiness(ready=not (self._draining or waiting), draining=self._draining,
                         waiting=waiting)

    def ready(self) -> bool:
        return self.readiness().ready

    def plugin_records(self) -> list[PluginRecord]:
        return self._plugins.records

    def metrics_exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The Prometheus scrape body and its content type (OpenMetrics when ``accept`` asks)."""
        # Collected on the event loop on purpose: breakers and queues are loop-owned state.
        if self._cache is not None:
            self.telemetry.metrics.sync_cache(self._cache.stats())
        body, content_type = self.telemetry.metrics.exposition(accept)
        if self._link is not None:
            replicas = self._link.cluster.metrics_exposition()
            head, eof, _ = body.rpartition(b"# EOF\n")  # OpenMetrics ends with its EOF line
            body = head + replicas + eof if eof else body + replicas
        return body, content_type

    # -- inference -----------------------------------------------------------------------

    async def infer(
        self, model: str, request: InferenceRequest, *, version: str | None = None,
        cache: CacheDirective | None = None,
    ) -> Answer:
        """Run one request (a model's, or an alias's through its failover chain)."""
        return await self._pipeline.infer(model, request, version=version, cache=cache)

    async def stream(
        self, model: str, request: InferenceRequest, *, version: str | None = None,
        cache: CacheDirective | None = None,
    ) -> StreamAnswer:
        """Start a streamed generation; the first chunk is awaited so errors surface before 200."""
        return await self._pipeline.stream(model, request, version=version, cache=cache)

    def resolve(
        self, model: str, version: str | None = None, task: Task | None = None
    ) -> ModelVersion:
        """The version a request for ``model`` (a model or an alias) would reach first now."""
        return self._router.resolve(model, version, task)

    def task_of(self, model: str, version: str | None = None) -> Task | None:
        """The task a request for ``model`` must be (404/503 when nothing can answer)."""
        unloaded = self._residency.target(model, version)
        if unloaded is None or unloaded.serving:
            return self._router.resolve(model, version).task
        if unloaded.task is None:  # known once it has loaded (or from config)
            raise ModelNotReadyError(
                f"model {model!r} loads on demand and its task is unknown until it has "
                "loaded: set task in its config, or load it first "
                f"(POST /v2/repository/models/{model}/load)", retry_after=1,
            )
        return unloaded.task

    # -- what callers may see ------------------------------------------------------------

    def model_cards(self, principal: Principal) -> list[ModelCard]:
        """Models the caller may see that can answer now, or once loaded on demand."""
        return model_cards(self._registry, principal)

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        """What ``name`` (a model, or an alias through the version it reaches first) serves."""
        chain = self._router.aliases.get(name)
        if chain is not None and version is None:
            found = self._router.resolve(name)
            return self._metadata(name, found, versions=[],
                                  alias_of=[str(t) for t in chain.targets])
        entry = self._registry.entry(name)
        if version is not None:
            found = self._registry.get(name, version)
        else:
            found = entry.active or next(iter(entry.versions.values()))
        return self._metadata(name, found, versions=list(entry.versions))

    def _metadata(
        self, name: str, found: ModelVersion, *, versions: list[str],
        alias_of: list[str] | None = None,
    ) -> ModelMetadata:
        info = found.backend.info() if found.backend is not None and found.serving else None
        return ModelMetadata(
            name=name, versions=versions, version=found.version, task=found.task,
            backend=found.spec.backend.name,
            state=found.state.value if found.state else None,
            active_version=self._registry.entry(found.name).active_version,
            breaker=found.breaker.snapshot(), info=info or BackendInfo(), alias_of=alias_of,
        )

    def repository_index(self, principal: Principal) -> list[IndexRow]:
        """Every version of every model the caller may see, with its v2 repository state."""
        return index_rows(self._registry, principal)

    def model_views(self) -> list[ModelView]:
        return [self._deployments.model_view(entry) for entry in self._registry]

    def overview(self, principal: Principal) -> Overview:
        """Every model and alias the caller may see, with versions, states and readiness."""
        return Overview(
            models=[m for m in self.model_views() if principal.may_use(m.name)],
            aliases=[a for a in self._router.alias_views() if principal.may_use(a.name)],
            ready=self.ready(),
            memory=self._residency.view(),
        )

    def version_view(self, name: str, version: str) -> VersionView:
        found = self._registry.entry(name).versions.get(version)
        if found is None:
            raise ModelNotFoundError(f"model {name!r} has no version {version!r}")
        return version_view(found)

    # -- administration ------------------------------------------------------------------

    async def load_model(self, name: str) -> None:
        """(Re)load every version of ``name`` that is not serving (v2 repository load).

        503 when none of its versions serves afterwards. For an on-demand model: the version
        a request would get, loaded within the memory budget (503 when it cannot be met).
        """
        on_demand = self._residency.target(name, None)
        if on_demand is not None:
            await self._residency.load(on_demand)
            return
        entry = await self._deployments.load_model(name)
        self._shared(name)
        failed = [v for v in entry.versions.values() if v.state == VersionState.FAILED]
        if failed and not any(v.serving for v in entry.versions.values()):
            raise ModelNotReadyError(f"model {name!r} failed to load: {failed[0].error}")

    async def unload_model(self, name: str) -> None:
        await self._deployments.unload_model(name)
        self._shared(name)

    def add_version(
        self, name: str, version: str, source: str, *, backend: str | None = None,
        task: Task | None = None, options: dict[str, Any] | None = None,
    ) -> VersionView:
        """Register a new version and load it in the background (it does not become active)."""
        added = self._deployments.add_version(
            name, version, source, backend=backend, task=task, options=options
        )
        self._shared(name)
        return version_view(added)

    async def unload_version(self, name: str, version: str) -> None:
        await self._deployments.unload_version(name, version)
        self._shared(name)

    async def swap_safety(self, name: str, to: str) -> SafetyReport:
        return await self._deployments.swap_safety(name, to)

    async def swap(self, name: str, to: str) -> SafetyReport:
        report = await self._deployments.swap(name, to)
        self._shared(name)
        return report

    async def rollback(self, name: str) -> str:
        target = await self._deployments.rollback(name)
        self._shared(name)
        return target

    def start_canary(self, name: str, to: str, percent: float) -> Canary:
        canary = self._deployments.start_canary(name, to, percent)
        self._shared(name)
        return canary

    def stop_canary(self, name: str) -> None:
        self._deployments.stop_canary(name)
        self._shared(name)

    async def promote_canary(self, name: str) -> SafetyReport:
        report = await self._deployments.promote_canary(name)
        self._shared(name)
        return report

    def _shared(self, name: str) -> None:
        """With a cluster, tell every other server of a change made here (in order)."""
        if self._link is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._link.publish(name, self._sync.routing(name))
        )
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def published(self) -> None:
        """Wait until every change made here so far has reached the cluster."""
        if self._publishing:
            await asyncio.gather(*self._publishing)

    def traffic(self, name: str) -> dict[str, float]:
        return self._deployments.traffic(name)

    def cache_stats(self) -> dict[str, Any]:
        return self._require_cache().stats()

    async def purge_cache(self, model: str | None = None) -> None:
        await self._require_cache().purge(model)

    def _require_cache(self) -> ResponseCache:
        if self._cache is None:
            raise ConflictError("the response cache is disabled ([cache] enabled = false)")
        return self._cache


def _warn_placement_ignored(specs: list[ModelSpec]) -> None:
    for spec in specs:
        if not spec.placement.is_default:
            log.warning(
                "model %s version %s: replicas, autoscaling and ray_actor_options apply to "
                "[cluster] engine = \"ray\" only; ignored in one process", spec.name,
                spec.version,
            )
