"""``ModelLoader``: a version's source becomes a serving backend with its batcher, and back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

from modelyard.core.backend import Backend, LoadContext, files_size
from modelyard.core.batching import Batcher, Clock
from modelyard.core.cluster import Cluster
from modelyard.core.errors import ModelLoadError, ModelyardError
from modelyard.core.probes import run_probe
from modelyard.core.registry import ModelVersion, VersionState
from modelyard.core.response_cache import ResponseCache
from modelyard.core.sources import Progress
from modelyard.core.telemetry import Telemetry

__all__ = ["ModelLoader", "ResolveSource"]

log = logging.getLogger(__name__)

#: ``resolve(source, cache_dir, progress) -> local path``; runs in a worker thread.
ResolveSource = Callable[[str, Path, Progress], Path]


class ModelLoader:
    """Loads one version at a time: source, backend, health check, batcher, warm-up probe."""

    def __init__(
        self,
        *,
        resolve_source: ResolveSource,
        cache_dir: Path,
        telemetry: Telemetry,
        clock: Clock,
        response_cache: Callable[[], ResponseCache | None],
        on_progress: Callable[[ModelVersion], None] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self._resolve_source = resolve_source
        self._cache_dir = cache_dir
        self._telemetry = telemetry
        self._clock = clock
        self._response_cache = response_cache
        #: Told after each change of a version's ``progress``/``phase`` (any thread).
        self._on_progress = on_progress or (lambda _version: None)
        #: With a cluster, each version's backend runs in its replicas; here is its stand-in.
        self._cluster = cluster

    async def load(self, version: ModelVersion, *, warmup_timeout_s: float | None = None) -> bool:
        """Load ``version`` until it is ready (True) or failed with its reason (False).

        With ``warmup_timeout_s`` the version must also answer its probe (a real request of
        its task) within that time before it is ready.
        """
        spec = version.spec
        started = self._clock()
        version.error = ""
        version.health = None
        version.set_state(VersionState.LOADING)
        try:
            backend = await self._build_backend(version)
        except asyncio.CancelledError:
            raise
        except ModelyardError as exc:  # ours and our backends' messages are written for clients
            self._failed(version, exc.detail)
            return False
        except Exception:  # a broken model must never take the server down
            # A runtime's own text may carry class names and source paths: the log gets it,
            # clients get a stable sentence.
            log.exception("loading %s:%s failed", spec.name, spec.version)
            self._failed(
                version, f"failed to load: backend {spec.backend.name!r} raised an unexpected "
                "error; the server log has the details",
            )
            return False
        version.memory_bytes = await self._memory_of(version, backend)
        version.last_used = self._clock()
        version.backend = backend
        version.batcher = self._batcher(version, backend)
        version.batcher.start()
        version.breaker.reset()  # a reloaded version starts with a clean record
        if warmup_timeout_s is not None and not await self._warm_up(version, warmup_timeout_s):
            return False
        version.progress, version.phase = 100.0, "ready"
        self._on_progress(version)
        self._telemetry.model_loaded(version, self._clock() - started)
        version.set_state(VersionState.READY)
        return True

    @staticmethod
    async def _memory_of(version: ModelVersion, backend: Backend) -> int:
        """What the backend says it holds; its files' size when its own figure fails."""
        try:
            return max(0, int(await asyncio.to_thread(backend.memory_bytes)))
        except Exception:  # a figure for the budget must never fail a load
            log.exception("memory_bytes of %s:%s raised", version.name, version.version)
            return await asyncio.to_thread(files_size, backend.context.path)

    def _batcher(self, version: ModelVersion, backend: Backend) -> Batcher:
        batching = version.spec.batching
        size = batching.max_batch_size or backend.max_batch_size
        if size > backend.max_batch_size:  # the backend's own limit is a hard cap
            log.warning(
                "model %s version %s: batching.max_batch_size %d exceeds the backend's limit "
                "%d; using %d", version.name, version.version, size, backend.max_batch_size,
                backend.max_batch_size,
            )
            size = backend.max_batch_size

        def stuck(reason: str) -> None:
            # Out of service until the call returns: the breaker (when on) refuses and
            # failover skips the version; the admin view shows why.
            version.breaker.force_open(reason)
            version.record_health(False, reason, time.time())

        return Batcher(
            backend,
            model=version.name,
            max_batch_size=size,
            max_queue_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue_size=batching.max_queue_size,
            refill_wait_s=batching.refill_wait_ms / 1000.0,
            concurrency=backend.concurrent_batches,
            clock=self._clock,
            on_batch=self._telemetry.batch_observer(version),
            on_stuck=stuck,
        )

    async def _build_backend(self, version: ModelVersion) -> Backend:
        spec = version.spec

        def progress(phase: str, percent: float) -> None:
            # Never backwards: a later step may name a lower figure than the last one reached.
            version.phase, version.progress = phase, max(version.progress, min(99.0, percent))
            self._on_progress(version)

        version.progress = 0.0
        if self._cluster is not None:
            return await self._replicas_of(version, progress)
        progress("resolving source", 0.0)
        # Preparing the source (a demo export) reports 0-100 of its own: it fills 0-50 overall.
        path = await asyncio.to_thread(
            self._resolve_source, spec.source, self._cache_dir,
            lambda phase, percent: progress(phase, percent / 2.0),
        )
        cache = self._response_cache()
        if cache is not None:
            progress("hashing weights", 10.0)
            version.weights_digest = await asyncio.to_thread(cache.weights_digest, path)
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

    async def _replicas_of(
        self, version: ModelVersion, progress: Callable[[str, float], None]
    ) -> Backend:
        """The stand-in for ``version``'s replicas, which resolve and load it themselves."""
        assert self._cluster is not None
        progress("starting replicas", 0.0)
        backend = await self._cluster.build_backend(version.spec, progress)
        if backend.task is None:
            await backend.unload()
            raise ModelLoadError(f"the replicas of {version.name!r} could not tell its task")
        version.task = backend.task
        if self._response_cache() is not None:
            version.weights_digest = backend.weights_digest or ""
        return backend

    async def _warm_up(self, version: ModelVersion, timeout_s: float) -> bool:
        """Send the probe before anyone else may; on failure the version is failed, unloaded."""
        version.phase, version.progress = "warm-up", max(version.progress, 95.0)
        self._on_progress(version)
        outcome = await run_probe(version, timeout_s=timeout_s)
        version.record_health(outcome.ok, outcome.detail, time.time())
        if outcome.ok:
            return True
        self._failed(version, f"warm-up probe failed: {outcome.detail}")
        await self.release(version)  # a failed version keeps its state and reason
        return False

    def _failed(self, version: ModelVersion, reason: str) -> None:
        log.error("model %s version %s failed to load: %s", version.name, version.version, reason)
        self._telemetry.model_load_failed(version)
        version.phase = "failed"
        version.set_state(VersionState.FAILED, error=reason)

    async def release(self, version: ModelVersion) -> None:
        """Stop the batcher and unload the backend; the version stays listed."""
        # Not serving from here on: a lookup while the batcher stops gets 503 (or, for an
        # on-demand model, a fresh load), never a queue that no worker will drain.
        backend, version.backend = version.backend, None
        if version.batcher is not None:
            await version.batcher.stop()
            version.batcher = None
        if backend is not None:
            try:
                await backend.unload()
            except Exception:
                log.exception("unloading %s:%s raised", version.name, version.version)
        if version.state != VersionState.FAILED:
            version.progress, version.phase = 0.0, "unloaded"
            version.set_state(VersionState.UNLOADED)
