"""``InferenceService``: the one core service behind every protocol (OpenAI, v2, admin)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import platformdirs

from modelyard import __version__
from modelyard.cache.config import CacheDirective
from modelyard.core.backend import Backend, LoadContext
from modelyard.core.batching import Batcher, BatchTiming, Clock
from modelyard.core.breaker import CircuitState
from modelyard.core.canary import Canary
from modelyard.core.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    ModelLoadError,
    ModelNotFoundError,
    ModelyardError,
    TimeoutError_,
    UnsupportedTaskError,
)
from modelyard.core.failover import (
    Availability,
    FailoverChain,
    Target,
    breaker_availability,
    build_chains,
)
from modelyard.core.limits import apply_limits
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import ModelEntry, ModelRegistry, ModelVersion, VersionState
from modelyard.core.settings import ModelSpec, Settings, decode_settings, resolve_models
from modelyard.core.sources import SourceResolver, resolve_source
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import (
    InferenceRequest,
    InferenceResult,
    StreamChunk,
    Task,
)

if TYPE_CHECKING:
    from modelyard.cache.layer import CacheLayer

__all__ = ["InferenceService"]

_T = TypeVar("_T")

log = logging.getLogger(__name__)


class InferenceService:
    """Owns the registry, loads versions, and runs every inference through their batchers."""

    def __init__(
        self,
        settings: Settings,
        plugins: PluginHost,
        *,
        clock: Clock = time.monotonic,
        source_resolver: SourceResolver = resolve_source,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.settings = settings
        self.plugins = plugins
        self.registry = ModelRegistry()
        self.specs: list[ModelSpec] = resolve_models(settings, plugins.backends)
        versions: dict[str, list[str]] = {}
        for spec in self.specs:
            versions.setdefault(spec.name, []).append(spec.version)
        #: Alias name -> its failover chain of targets.
        self.aliases: dict[str, FailoverChain] = build_chains(settings.aliases, versions)
        self._clock = clock
        self._resolve_source = source_resolver
        self._loader: asyncio.Task[None] | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        # Per model: previously active versions, newest last, for rollback.
        self._history: dict[str, list[str]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._canaries: dict[str, Canary] = {}
        #: Why each model's last canary was rolled back automatically (shown in /admin/models).
        self.canary_rollbacks: dict[str, str] = {}
        self.started_at = 0.0
        self.started_wall = time.time()
        self.draining = False
        #: Metrics, tracing and request context; one per service, so apps never share them.
        self.telemetry = (
            telemetry if telemetry is not None
            else Telemetry(log_prompts=settings.server.log_prompts)
        )
        self.telemetry.watch(self)
        self.cache: CacheLayer | None = None

    @staticmethod
    def default_cache_dir(settings: Settings) -> Path:
        """Where ``demo:`` sources are prepared: ``cache_dir`` or the user cache directory."""
        if settings.cache_dir:
            return Path(settings.cache_dir).expanduser()
        return Path(platformdirs.user_cache_dir("modelyard"))

    @property
    def cache_dir(self) -> Path:
        return self.default_cache_dir(self.settings)

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Announce startup and begin loading every configured version in the background."""
        self.started_at = self._clock()
        self.cache = await self._open_cache()
        self.plugins.server_startup(self)
        for spec in self.specs:
            version = ModelVersion(spec, self._state_changed, clock=self._clock)
            self.registry.add(version)
            version.set_state(VersionState.LOADING)
        self._loader = asyncio.get_running_loop().create_task(self._load_configured())

    async def wait_until_loaded(self) -> None:
        if self._loader is not None:
            await asyncio.shield(self._loader)

    async def stop(self) -> None:
        """Stop loading, tell plugins, and unload every version."""
        self.draining = True
        if self._loader is not None and not self._loader.done():
            self._loader.cancel()
            try:
                await self._loader
            except asyncio.CancelledError:
                pass
        self.plugins.server_shutdown(self)
        for entry in list(self.registry):
            for version in list(entry.versions.values()):
                await self._release(version)
        if self.cache is not None:
            await self.cache.close()

    async def _open_cache(self) -> CacheLayer | None:
        if not self.settings.cache.enabled:
            return None
        try:
            from modelyard.cache.factory import build_cache_layer
        except ImportError as exc:
            raise ConfigError(f"$.cache: install modelyard[cache] ({exc.name} is missing)") from None
        return await asyncio.to_thread(
            build_cache_layer, self.settings.cache, self.plugins.cache_tiers,
            server_cache_dir=self.cache_dir,
        )

    async def _load_configured(self) -> None:
        # One at a time: loads compete for the same cores and memory anyway, and a
        # sequential order keeps progress output readable.
        for spec in self.specs:
            version = self.registry.entry(spec.name).versions[spec.version]
            await self._load(version, activate=spec.active)

    def ready(self) -> bool:
        """True when every required model has a serving active version and we are not draining."""
        if self.draining:
            return False
        for entry in self.registry:
            if entry.required and (entry.active is None or not entry.active.serving):
                return False
        return True

    # -- loading -------------------------------------------------------------------------

    async def _load(self, version: ModelVersion, *, activate: bool) -> None:
        spec = version.spec
        started = self._clock()
        version.error = ""
        version.set_state(VersionState.LOADING)
        try:
            backend = await self._build_backend(version)
        except asyncio.CancelledError:
            raise
        except ModelyardError as exc:
            self._failed(version, exc.detail)
            return
        except Exception as exc:  # a broken model must never take the server down
            log.exception("loading %s:%s failed", spec.name, spec.version)
            self._failed(version, f"{type(exc).__name__}: {exc}")
            return
        version.backend = backend
        size = spec.batching.max_batch_size or backend.max_batch_size
        version.batcher = Batcher(
            backend,
            max_batch_size=size,
            max_queue_delay_s=spec.batching.max_queue_delay_ms / 1000.0,
            max_queue_size=spec.batching.max_queue_size,
            refill_wait_s=spec.batching.refill_wait_ms / 1000.0,
            concurrency=backend.concurrent_batches,
            clock=self._clock,
            on_batch=self.telemetry.batch_observer(version),
        )
        version.batcher.start()
        version.breaker.reset()  # a reloaded version starts with a clean record
        version.progress, version.phase = 100.0, "ready"
        self.telemetry.model_loaded(version, self._clock() - started)
        version.set_state(VersionState.READY)
        if activate:
            self._activate(version)

    async def _build_backend(self, version: ModelVersion) -> Backend:
        spec = version.spec

        def progress(phase: str, percent: float) -> None:
            # Never backwards: a later step may name a lower figure than the last one reached.
            version.phase, version.progress = phase, max(version.progress, min(99.0, percent))

        version.progress = 0.0
        progress("resolving source", 0.0)
        # Preparing the source (a demo export) reports 0-100 of its own: it fills 0-50 overall.
        path = await asyncio.to_thread(
            self._resolve_source, spec.source, self.cache_dir,
            lambda phase, percent: progress(phase, percent / 2.0),
        )
        if self.cache is not None:
            from modelyard.cache.keys import weights_digest

            progress("hashing weights", 10.0)
            version.weights_digest = await asyncio.to_thread(weights_digest, path)
        task = spec.task or spec.backend.detect_task(path, spec.options)
        if task is None:
            raise ModelLoadError(
                f"cannot tell the task of {spec.name!r}; set task in config "
                f"({', '.join(sorted(spec.backend.tasks))})"
            )
        version.task = task
        context = LoadContext(
            model=spec.name, version=spec.version, task=task, source=spec.source, path=path,
            options=spec.options,
        )
        backend = spec.backend(context)
        progress("loading", 50.0)
        await backend.load()
        progress("health check", 90.0)
        report = await backend.health()
        if not report.healthy:
            await backend.unload()
            raise ModelLoadError(f"health check failed: {report.detail or 'unhealthy'}")
        return backend

    def _failed(self, version: ModelVersion, reason: str) -> None:
        log.error("model %s version %s failed to load: %s", version.name, version.version, reason)
        version.phase = "failed"
        version.set_state(VersionState.FAILED, error=reason)

    def _activate(self, version: ModelVersion, *, remember: bool = True) -> None:
        entry = self.registry.entry(version.name)
        previous = entry.active
        # One synchronous assignment: requests admitted before it hold the old version and
        # finish there; every later lookup sees the new one.
        entry.active_version = version.version
        version.set_state(VersionState.ACTIVE)
        if previous is not None and previous is not version and previous.serving:
            previous.set_state(VersionState.DEPRECATED)
            if remember:
                self._history.setdefault(entry.name, []).append(previous.version)

    async def _release(self, version: ModelVersion) -> None:
        if version.batcher is not None:
            await version.batcher.stop()
            version.batcher = None
        backend, version.backend = version.backend, None
        if backend is not None:
            try:
                await backend.unload()
            except Exception:
                log.exception("unloading %s:%s raised", version.name, version.version)
        if version.state != VersionState.FAILED:
            version.progress, version.phase = 0.0, "unloaded"
            version.set_state(VersionState.UNLOADED)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def load_model(self, name: str) -> ModelEntry:
        """(Re)load every configured version of ``name`` that is not serving (v2 repository load)."""
        entry = self.registry.entry(name)
        async with self._lock(name):
            for version in list(entry.versions.values()):
                if version.serving:
                    continue
                activate = version.spec.active or entry.active_version in (None, version.version)
                await self._load(version, activate=activate)
        return entry

    async def unload_model(self, name: str) -> ModelEntry:
        """Unload every version of ``name``; it stays listed and can be loaded again."""
        entry = self.registry.entry(name)
        async with self._lock(name):
            for version in list(entry.versions.values()):
                await self._release(version)
        return entry

    async def unload_version(self, name: str, version_label: str) -> None:
        """Unload and forget a non-active version, releasing its memory."""
        entry = self.registry.entry(name)
        if version_label not in entry.versions:
            raise ModelNotFoundError(f"model {name!r} has no version {version_label!r}")
        if entry.active_version == version_label:
            raise ConflictError(f"version {version_label!r} of {name!r} is active; swap first")
        lock = self._lock(name)
        if lock.locked():
            raise ConflictError(f"another operation on {name!r} is in progress")
        async with lock:
            version = entry.versions[version_label]
            await self._release(version)
            self.registry.remove(name, version_label)
            history = self._history.get(name, [])
            if version_label in history:
                history.remove(version_label)

    # -- versions: add, swap, rollback ---------------------------------------------------

    def add_version(
        self,
        name: str,
        version_label: str,
        source: str,
        *,
        backend: str | None = None,
        task: Task | None = None,
        options: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Register a new version and load it in the background (it does not become active)."""
        entry = self.registry.entry(name)
        existing = entry.versions.get(version_label)
        if existing is not None and existing.state not in (VersionState.FAILED, VersionState.UNLOADED):
            raise ConflictError(f"model {name!r} already has version {version_label!r}")
        template = (entry.active or next(iter(entry.versions.values()))).spec
        backend_cls = self.plugins.backends.get(backend or template.backend.name)
        if backend_cls is None:
            installed = ", ".join(sorted(self.plugins.backends))
            raise ConfigError(f"$.backend: unknown backend {backend!r}; installed: {installed}")
        raw = {
            "name": name, "version": version_label, "backend": backend_cls.name, "source": source,
            "task": (task or template.task), "options": options if options is not None else
            (msgspec.to_builtins(template.options) if backend_cls is template.backend else {}),
            "required": False,
            "batching": msgspec.to_builtins(template.batching),
            "breaker": msgspec.to_builtins(template.breaker),
        }
        try:
            settings = decode_settings({"models": [raw]}, env={})
            spec = resolve_models(settings, {backend_cls.name: backend_cls})[0]
        except ConfigError as exc:
            # Re-root the path at the request body rather than a config file.
            raise ConfigError(exc.detail.replace("$.models[0]", "$", 1)) from None
        spec = msgspec.structs.replace(spec, active=False, required=template.required)
        version = ModelVersion(spec, self._state_changed, clock=self._clock)
        self.registry.add(version)
        version.set_state(VersionState.LOADING)
        self._spawn(self._load_locked(version))
        return version

    async def _load_locked(self, version: ModelVersion) -> None:
        async with self._lock(version.name):
            await self._load(version, activate=False)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def swap_safety(self, name: str, to: str) -> dict[str, Any]:
        """Whether ``to`` may become active now, check by check."""
        entry = self.registry.entry(name)
        target = entry.versions.get(to)
        checks: list[dict[str, Any]] = []

        def check(check_name: str, ok: bool, detail: str = "") -> None:
            checks.append({"name": check_name, "ok": ok, "detail": detail})

        check("target_exists", target is not None, "" if target else f"no version {to!r}")
        check("target_ready", bool(target and target.serving),
              target.state.value if target and target.state else "")
        check("no_concurrent_operation", not self._lock(name).locked())
        check("target_not_active", entry.active_version != to)
        score = 0.0
        if target is not None and target.serving and target.backend is not None:
            report = await target.backend.health()
            score = 1.0 if report.healthy else 0.0
            check("target_healthy", report.healthy, report.detail)
        else:
            check("target_healthy", False, "not serving")
        threshold = self.settings.server.swap_health_threshold
        check("health_score", score >= threshold, f"{score:.2f} (threshold {threshold:.2f})")
        return {"model": name, "to": to, "from": entry.active_version,
                "safe": all(c["ok"] for c in checks), "checks": checks}

    async def swap(self, name: str, to: str) -> dict[str, Any]:
        """Make ``to`` active atomically; 409 with the safety report when unsafe."""
        report = await self.swap_safety(name, to)
        if not report["safe"]:
            raise ConflictError(f"swap of {name!r} to {to!r} is not safe", extra={"report": report})
        async with self._lock(name):
            self._activate(self.registry.entry(name).versions[to])
            self.telemetry.swapped(name)
            await self._prune_deprecated(name)
        return report

    async def rollback(self, name: str) -> str:
        """Return to the previously active version (kept loaded as deprecated)."""
        entry = self.registry.entry(name)
        history = self._history.get(name, [])
        while history and not (history[-1] in entry.versions and entry.versions[history[-1]].serving):
            history.pop()
        if not history:
            raise ConflictError(f"model {name!r} has no previous version to roll back to")
        if self._lock(name).locked():
            raise ConflictError(f"another operation on {name!r} is in progress")
        async with self._lock(name):
            target = history.pop()
            self._activate(entry.versions[target], remember=False)
            self.telemetry.rolled_back(name, "manual")
        return target

    async def _prune_deprecated(self, name: str) -> None:
        keep = self.settings.server.keep_deprecated
        history = self._history.get(name, [])
        while len(history) > keep:
            oldest = history.pop(0)
            version = self.registry.entry(name).versions.get(oldest)
            if version is not None and version.state == VersionState.DEPRECATED:
                await self._release(version)

    # -- inference -----------------------------------------------------------------------

    def _serving(self, model: str, task: Task, version: str | None) -> ModelVersion:
        found = self.registry.get(model, version)
        canary = self._canaries.get(model) if version is None else None
        if canary is not None and canary.pick():
            target = self.registry.entry(model).versions.get(canary.target)
            if target is not None and target.serving and not self._roll_back_canary_if_open(target):
                found = target
        if not serves(found, task):
            served = found.task.value if found.task else "nothing"
            raise UnsupportedTaskError(f"model {model!r} serves {served}, not {task.value}")
        return found

    def _alias(self, model: str, version: str | None) -> FailoverChain | None:
        chain = self.aliases.get(model)
        if chain is not None and version is not None:
            raise ModelNotFoundError(f"{model!r} is an alias; it has no version {version!r}")
        return chain

    def _target_availability(self, target: Target, task: Task) -> Availability:
        found = self.registry.get(target.model, target.version)  # 404/503: the chain skips it
        if not serves(found, task):
            served = found.task.value if found.task else "nothing"
            return Availability.down(f"serves {served}, not {task.value}")
        return breaker_availability(found.breaker)

    def resolve(self, model: str, task: Task | None = None) -> ModelVersion:
        """The version a request for ``model`` (a model or an alias) would reach first now."""
        chain = self.aliases.get(model)
        if chain is None:
            return self.registry.get(model)
        for target in chain.targets[:-1]:
            if task is None or self._target_availability(target, task).up:
                try:
                    return self.registry.get(target.model, target.version)
                except ModelyardError:
                    continue
        last = chain.targets[-1]
        return self.registry.get(last.model, last.version)

    async def infer(
        self, model: str, request: InferenceRequest, *, version: str | None = None,
        cache: CacheDirective | None = None,
    ) -> tuple[ModelVersion, InferenceResult]:
        """Run one request (a model's, or an alias's through its failover chain)."""
        return await self._route(
            model, version, request.task,
            lambda name, label: self._infer_one(name, request, label, cache),
        )

    async def _route(
        self, model: str, version: str | None, task: Task,
        call: Callable[[str, str | None], Awaitable[_T]],
    ) -> _T:
        """Call ``call`` for a model directly, or along an alias's failover chain."""
        chain = self._alias(model, version)
        if chain is None:
            return await call(model, version)
        answer = await chain.run(
            lambda t: call(t.model, t.version),
            availability=lambda t: self._target_availability(t, task),
        )
        return answer.value

    async def _infer_one(
        self, model: str, request: InferenceRequest, version: str | None,
        directive: CacheDirective | None = None,
    ) -> tuple[ModelVersion, InferenceResult]:
        """Through the cache, then the version's breaker and batcher; 504 past the timeout."""
        found = self._serving(model, request.task, version)
        self.telemetry.serving(found, request)
        request = apply_limits(self.settings.limits.for_model(model), model, request)
        key = self._cache_key(found, request, directive)
        if self.cache is None or directive is None or key is None:
            return await self._guarded(found, model, request)

        async def run() -> InferenceResult:
            return (await self._guarded(found, model, request))[1]

        result, outcome = await self.cache.lookup_or_run(key, run, refresh=directive.refresh)
        directive.status = "BYPASS" if directive.refresh else outcome.upper()
        self.telemetry.cache_result(directive.status.lower())
        return found, result

    async def _guarded(
        self, found: ModelVersion, model: str, request: InferenceRequest
    ) -> tuple[ModelVersion, InferenceResult]:
        assert found.batcher is not None
        try:
            with found.breaker.acquire():  # 503 + Retry-After while open; records the outcome
                return await self._submit(found, model, request)
        finally:
            self._roll_back_canary_if_open(found)

    async def _submit(
        self, found: ModelVersion, model: str, request: InferenceRequest
    ) -> tuple[ModelVersion, InferenceResult]:
        assert found.batcher is not None
        timeout_ms = found.spec.batching.timeout_ms
        timeout_s = timeout_ms / 1000.0 if timeout_ms else self.settings.server.request_timeout_s
        timing = BatchTiming()
        try:
            async with asyncio.timeout(timeout_s):
                result = await found.batcher.submit(request, timing=timing)
        except TimeoutError:
            self._record_outcome(found, failed=True)
            raise TimeoutError_(f"model {model!r} did not answer within {timeout_s:g}s") from None
        except ModelyardError as exc:
            self._record_outcome(found, failed=exc.status_code >= 500)
            raise
        except Exception:
            self._record_outcome(found, failed=True)
            raise
        finally:
            self.telemetry.batched(found, timing)
        self._record_outcome(found, failed=False)
        self.telemetry.answered(found, result)
        return found, result

    async def stream(
        self, model: str, request: InferenceRequest, *, version: str | None = None,
        cache: CacheDirective | None = None,
    ) -> tuple[ModelVersion, AsyncIterator[StreamChunk]]:
        """Start a streamed generation; the first chunk is awaited so errors surface before 200."""
        return await self._route(
            model, version, request.task,
            lambda name, label: self._stream_one(name, request, label, cache),
        )

    async def _stream_one(
        self, model: str, request: InferenceRequest, version: str | None,
        directive: CacheDirective | None = None,
    ) -> tuple[ModelVersion, AsyncIterator[StreamChunk]]:
        found = self._serving(model, request.task, version)
        self.telemetry.serving(found, request)
        request = apply_limits(self.settings.limits.for_model(model), model, request)
        backend = found.backend
        assert backend is not None
        if not backend.supports_streaming:
            raise UnsupportedTaskError(f"model {model!r} does not stream")
        key = self._cache_key(found, request, directive)
        if self.cache is not None and directive is not None and key is not None:

            async def start() -> AsyncIterator[StreamChunk]:
                return await self._start_stream(found, model, request)

            chunks, outcome = await self.cache.stream_through(key, start, refresh=directive.refresh)
            directive.status = "BYPASS" if directive.refresh else outcome.upper()
            self.telemetry.cache_result(directive.status.lower())
            return found, chunks
        return found, await self._start_stream(found, model, request)

    async def _start_stream(
        self, found: ModelVersion, model: str, request: InferenceRequest
    ) -> AsyncIterator[StreamChunk]:
        backend = found.backend
        assert backend is not None
        # The breaker hears about the start only: for a stream, "slow" is time to first token.
        with found.breaker.acquire():
            chunks = aiter(self.telemetry.observe_stream(found, backend.stream(request)))
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except ModelyardError:
                raise
            except Exception as exc:
                log.exception("stream from %s failed to start", model)
                raise BackendError(f"backend failed: {type(exc).__name__}: {exc}") from None
        return _prepend(first, chunks)

    def _cache_key(
        self, found: ModelVersion, request: InferenceRequest, directive: CacheDirective | None
    ) -> bytes | None:
        """The key for the version that will serve; None when the cache must not be used."""
        if self.cache is None or directive is None:
            return None
        cls = found.spec.backend
        return self.cache.key_for(
            request, model=found.name, version=found.version,
            weights_digest=found.weights_digest, backend=cls.name,
            backend_version=f"{__version__}/{cls.__module__}", tenant=directive.tenant,
        )

    # -- canary --------------------------------------------------------------------------

    def start_canary(self, name: str, to: str, percent: float) -> Canary:
        """Send ``percent`` of ``name``'s traffic to version ``to`` (ready, not active)."""
        entry = self.registry.entry(name)
        target = entry.versions.get(to)
        if target is None:
            raise ModelNotFoundError(f"model {name!r} has no version {to!r}")
        if not target.serving or entry.active_version == to:
            raise ConflictError(f"version {to!r} of {name!r} must be ready and not active")
        server = self.settings.server
        canary = Canary(to, percent, min_calls=server.canary_min_calls,
                        error_margin=server.canary_error_margin)
        self._canaries[name] = canary
        self.canary_rollbacks.pop(name, None)
        log.info("canary: %s version %s takes %g%% of traffic", name, to, percent)
        return canary

    def stop_canary(self, name: str, *, reason: str = "") -> None:
        canary = self._canaries.pop(name, None)
        if canary is None:
            raise ConflictError(f"model {name!r} has no canary")
        if reason:
            self.telemetry.rolled_back(name, "canary")
            self.canary_rollbacks[name] = reason
            log.warning("canary of %s version %s rolled back: %s", name, canary.target, reason)

    async def promote_canary(self, name: str) -> dict[str, Any]:
        canary = self._canaries.get(name)
        if canary is None:
            raise ConflictError(f"model {name!r} has no canary")
        report = await self.swap(name, canary.target)
        self._canaries.pop(name, None)
        return report

    def _record_outcome(self, version: ModelVersion, *, failed: bool) -> None:
        canary = self._canaries.get(version.name)
        if canary is None:
            return
        canary.record(version.version, failed=failed)
        reason = canary.rollback_reason(self.registry.entry(version.name).active_version)
        if reason:
            self.stop_canary(version.name, reason=reason)

    def _roll_back_canary_if_open(self, version: ModelVersion) -> bool:
        """A canary whose circuit breaker opened is rolled back at once; True if it was."""
        canary = self._canaries.get(version.name)
        if canary is None or canary.target != version.version:
            return False
        if version.breaker.state != CircuitState.OPEN:
            return False
        self.stop_canary(version.name, reason="the canary's circuit breaker opened")
        return True

    def traffic(self, name: str) -> dict[str, float]:
        """Share of new requests (percent) each version of ``name`` receives."""
        entry = self.registry.entry(name)
        shares: dict[str, float] = {}
        if entry.active_version is not None:
            shares[entry.active_version] = 100.0
        canary = self._canaries.get(name)
        if canary is not None and entry.active_version is not None:
            shares[entry.active_version] = 100.0 - canary.percent
            shares[canary.target] = canary.percent
        return shares

    # -- queries -------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every model, its versions and states, for admin endpoints and the CLI."""
        return [
            {
                "name": entry.name,
                "active_version": entry.active_version,
                "required": entry.required,
                "versions": [v.describe() for v in entry.versions.values()],
                "traffic": self.traffic(entry.name),
                "canary": c.snapshot() if (c := self._canaries.get(entry.name)) else None,
                "last_canary_rollback": self.canary_rollbacks.get(entry.name),
            }
            for entry in self.registry
        ]

    def describe_aliases(self) -> list[dict[str, Any]]:
        """Every alias, its failover counters and the breaker state of each target."""
        rows = []
        for chain in self.aliases.values():
            row = chain.describe()
            row["target_states"] = {str(t): self._target_state(t) for t in chain.targets}
            rows.append(row)
        return rows

    def _target_state(self, target: Target) -> str:
        try:
            return self.registry.get(target.model, target.version).breaker.state.value
        except ModelyardError as exc:
            return f"unavailable: {exc.detail}"

    def _state_changed(
        self, version: ModelVersion, old: VersionState | None, new: VersionState
    ) -> None:
        log.info(
            "model %s version %s: %s -> %s", version.name, version.version,
            old.value if old else "-", new.value,
            extra={"model": version.name, "version": version.version,
                   "old_state": old.value if old else None, "new_state": new.value},
        )
        self.plugins.model_version_state_changed(version, old, new)


def serves(version: ModelVersion, task: Task) -> bool:
    """A chat model also serves raw completions when its backend can."""
    if version.task == task:
        return True
    return (
        version.task == Task.CHAT
        and task == Task.COMPLETION
        and Task.COMPLETION in version.spec.backend.tasks
    )


async def _prepend(
    first: StreamChunk | None, rest: AsyncIterator[StreamChunk]
) -> AsyncIterator[StreamChunk]:
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        # Closing the backend's generator is how a disconnected client frees its slot.
        closer = getattr(rest, "aclose", None)
        if closer is not None:
            await closer()


def to_json(value: Any) -> bytes:
    return msgspec.json.encode(value)
