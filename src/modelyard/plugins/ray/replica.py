"""``ModelReplica``: one model version served inside a Ray Serve replica process.

The replica builds the version exactly as a single-process server does (the same plugins,
source schemes, backend, batcher and warm-up), then answers the ingress's calls. Errors cross
the process boundary as ``(error class name, detail)`` so the ingress raises the same
``ModelyardError`` (and status code) the backend raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec

from modelyard.core import errors
from modelyard.core.errors import ModelLoadError, ModelyardError
from modelyard.core.loader import ModelLoader
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import ModelVersion
from modelyard.core.settings import Settings, cache_dir_of, decode_settings, resolve_models
from modelyard.core.sources import SourceResolver
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import InferenceRequest, InferenceResult, StreamChunk

__all__ = ["Failure", "ModelReplica", "ReplicaFacts", "error_from", "failure_of"]

log = logging.getLogger(__name__)

#: How often a replica sends its metrics to the coordinator.
METRICS_INTERVAL_S = 5.0


class Failure(msgspec.Struct, frozen=True):
    """An error on its way from a replica to the ingress."""

    kind: str
    detail: str


class ReplicaFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What the ingress needs to know of a loaded version."""

    task: str
    max_batch_size: int
    concurrent_batches: int
    supports_streaming: bool
    memory_bytes: int
    weights_digest: str
    info: dict[str, Any]


def failure_of(exc: BaseException) -> Failure:
    if isinstance(exc, ModelyardError):
        return Failure(type(exc).__name__, exc.detail)
    log.exception("a replica call raised", exc_info=exc)
    return Failure("BackendError", "the backend raised an unexpected error; see the replica log")


def error_from(failure: Failure) -> ModelyardError:
    """The ingress-side error for a replica's ``Failure`` (a 500 for a kind it does not know)."""
    cls = getattr(errors, failure.kind, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelyardError)):
        cls = errors.BackendError
    try:
        return cls(failure.detail)
    except TypeError:  # an error whose constructor wants more than a detail
        return errors.BackendError(failure.detail)


class ModelReplica:
    """The Ray Serve deployment class: one version, loaded once per replica process."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self, config: dict[str, Any], app: str, coordinator: Any = None,
        add_plugins: Callable[[PluginHost, Settings], object] | None = None,
    ) -> None:
        settings = decode_settings(config, env={})
        host = PluginHost()
        host.load_entry_points()
        if add_plugins is not None:
            add_plugins(host, settings)
        # The config carries this version's entry only.
        spec = resolve_models(settings, host.backends, unavailable=host.unavailable())[0]
        cache = None
        if settings.cache.enabled:
            cache = await asyncio.to_thread(
                host.open_response_cache, settings.cache, cache_dir_of(settings)
            )
        self._telemetry = Telemetry()
        loader = ModelLoader(
            resolve_source=SourceResolver(host.source_schemes),
            cache_dir=cache_dir_of(settings), telemetry=self._telemetry, clock=time.monotonic,
            response_cache=lambda: cache,
        )
        self._loader = loader
        self._version = ModelVersion(spec, lambda *_: None, clock=time.monotonic)
        self._coordinator = coordinator
        self._key = f"{spec.name}:{spec.version}:{os.getpid()}"
        if not await loader.load(self._version):
            if coordinator is not None:
                with contextlib.suppress(Exception):
                    await coordinator.report_failure.remote(app, self._version.error)
            raise ModelLoadError(self._version.error)
        if cache is not None:
            await cache.close()
        self._metrics_task = asyncio.get_running_loop().create_task(self._send_metrics())

    async def describe(self) -> ReplicaFacts:
        version = self._version
        backend = version.backend
        assert backend is not None and version.task is not None
        info = await asyncio.to_thread(backend.info)
        return ReplicaFacts(
            task=version.task.value,
            max_batch_size=version.batcher.max_batch_size if version.batcher else 1,
            concurrent_batches=backend.concurrent_batches,
            supports_streaming=backend.supports_streaming,
            memory_bytes=version.memory_bytes,
            weights_digest=version.weights_digest,
            info=msgspec.to_builtins(info),
        )

    async def infer(
        self, batch: Sequence[InferenceRequest], trace: dict[str, str] | None = None
    ) -> list[InferenceResult | Failure]:
        """Each request through this replica's batcher; a failure stays with its request."""
        batcher = self._version.batcher
        if batcher is None:
            return [Failure("ModelNotReadyError", "the replica is not serving")] * len(batch)
        with self._traced("modelyard.replica.infer", trace):
            outcomes = await asyncio.gather(
                *(batcher.submit(request) for request in batch), return_exceptions=True
            )
        return [failure_of(o) if isinstance(o, BaseException) else o for o in outcomes]

    async def stream(
        self, request: InferenceRequest, trace: dict[str, str] | None = None
    ) -> AsyncIterator[StreamChunk | Failure]:
        backend = self._version.backend
        if backend is None:
            yield Failure("ModelNotReadyError", "the replica is not serving")
            return
        with self._traced("modelyard.replica.stream", trace):
            chunks = backend.stream(request)
            try:
                async for chunk in chunks:
                    yield chunk
            except Exception as exc:  # the ingress raises it as the backend's own error
                yield failure_of(exc)
            finally:
                # The ingress closing its stream (a client gone) ends the generation here.
                await chunks.aclose()  # type: ignore[attr-defined]

    async def check_health(self) -> None:
        """Ray Serve's periodic check: an unhealthy backend gets its replica replaced."""
        backend = self._version.backend
        if backend is None:
            raise RuntimeError("the replica is not serving")
        report = await backend.health()
        if not report.healthy:
            raise RuntimeError(f"unhealthy: {report.detail}")

    async def metrics(self) -> bytes:
        return self._telemetry.metrics.exposition(None)[0]

    async def _send_metrics(self) -> None:
        if self._coordinator is None:
            return
        while True:
            with contextlib.suppress(Exception):
                await self._coordinator.report_metrics.remote(self._key, await self.metrics())
            await asyncio.sleep(METRICS_INTERVAL_S)

    def _traced(self, name: str, carrier: dict[str, str] | None) -> Any:
        return self._telemetry.tracing.remote_span(name, carrier or {})

    async def __del__(self) -> None:
        with contextlib.suppress(Exception):
            await self._loader.release(self._version)

