"""``InferencePipeline``: limits → cache → breaker → batcher → backend, for every request.

Unary and streamed requests take the same path; they differ only in the last step (a batched
call, or the backend's stream started until its first chunk) and in how the cache keeps the
answer (stored, or recorded as it streams).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from modelyard._version import __version__
from modelyard.core.batching import BatchTiming
from modelyard.core.breaker import counts_as_failure
from modelyard.core.canaries import Canaries
from modelyard.core.errors import (
    BackendError,
    ModelyardError,
    TimeoutError_,
    UnsupportedTaskError,
)
from modelyard.core.limits import apply_limits
from modelyard.core.registry import ModelRegistry, ModelVersion
from modelyard.core.residency import HeldStream
from modelyard.core.response_cache import CacheDirective, CacheStatus, ResponseCache
from modelyard.core.routing import Router
from modelyard.core.settings import Settings
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import InferenceRequest, InferenceResult, StreamChunk

__all__ = ["Answer", "InferencePipeline", "StreamAnswer"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's result, the version that gave it, and whether the cache did."""

    version: ModelVersion
    result: InferenceResult
    cache: CacheStatus = CacheStatus.BYPASS


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """A started stream (its first chunk already produced), its version and cache status."""

    version: ModelVersion
    chunks: AsyncIterator[StreamChunk]
    cache: CacheStatus = CacheStatus.BYPASS


class InferencePipeline:
    """Runs requests through one version, chosen by the router, under the version's guards."""

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        router: Router,
        canaries: Canaries,
        telemetry: Telemetry,
        response_cache: Callable[[], ResponseCache | None],
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._router = router
        self._canaries = canaries
        self._telemetry = telemetry
        self._response_cache = response_cache

    async def infer(
        self, model: str, request: InferenceRequest, *, version: str | None = None,
        cache: CacheDirective | None = None,
    ) -> Answer:
        """Run one request (a model's, or an alias's through its failover chain)."""

        async def one(name: str, label: str | None) -> Answer:
            found, result, status = await self._through(
                name, request, label, cache, self._guarded, _lookup_or_run
            )
            return Answer(found, result, status)

        return await self._router.route(model, version, request.task, one)

    async def stream(
        self, model: str, request: InferenceRequest, *, version: str | None = None,
        cache: CacheDirective | None = None,
    ) -> StreamAnswer:
        """Start a streamed generation; the first chunk is awaited so errors surface before 200."""

        async def one(name: str, label: str | None) -> StreamAnswer:
            found, chunks, status = await self._through(
                name, request, label, cache, self._start_stream, _stream_through, streaming=True
            )
            return StreamAnswer(found, HeldStream(found, chunks), status)

        return await self._router.route(model, version, request.task, one)

    async def _through(
        self,
        model: str,
        request: InferenceRequest,
        version: str | None,
        directive: CacheDirective | None,
        call: Callable[[ModelVersion, str, InferenceRequest], Awaitable[_T]],
        via_cache: Callable[[ResponseCache, bytes, Callable[[], Awaitable[_T]], bool],
                            Awaitable[tuple[_T, str]]],
        *,
        streaming: bool = False,
    ) -> tuple[ModelVersion, _T, CacheStatus]:
        """Pick the version and hold it in flight (a stream: until it ends) while it serves."""
        found = self._router.pick(model, request.task, version)
        found.begin_request()  # a version in flight is never evicted (core/residency.py)
        try:
            value, status = await self._serve(
                found, model, request, directive, call, via_cache, streaming
            )
        except BaseException:
            found.end_request()
            raise
        if not streaming:
            found.end_request()
        return found, value, status

    async def _serve(
        self,
        found: ModelVersion,
        model: str,
        request: InferenceRequest,
        directive: CacheDirective | None,
        call: Callable[[ModelVersion, str, InferenceRequest], Awaitable[_T]],
        via_cache: Callable[[ResponseCache, bytes, Callable[[], Awaitable[_T]], bool],
                            Awaitable[tuple[_T, str]]],
        streaming: bool,
    ) -> tuple[_T, CacheStatus]:
        """Apply limits, then the cache around ``call`` when it may answer."""
        self._telemetry.serving(found, request)
        request = apply_limits(self._settings.limits.for_model(model), model, request)
        if streaming and not (found.backend is not None and found.backend.supports_streaming):
            raise UnsupportedTaskError(f"model {model!r} does not stream")
        cache = self._response_cache()
        key = self._cache_key(cache, found, request, directive)
        if cache is None or directive is None or key is None:
            return await call(found, model, request), CacheStatus.BYPASS

        def run() -> Awaitable[_T]:
            return call(found, model, request)

        value, outcome = await via_cache(cache, key, run, directive.refresh)
        status = CacheStatus.BYPASS if directive.refresh else CacheStatus(outcome.upper())
        self._telemetry.cache_result(status.lower())
        return value, status

    @staticmethod
    def _cache_key(
        cache: ResponseCache | None, found: ModelVersion, request: InferenceRequest,
        directive: CacheDirective | None,
    ) -> bytes | None:
        """The key for the version that will serve; None when the cache must not be used."""
        if cache is None or directive is None:
            return None
        cls = found.spec.backend
        return cache.key_for(
            request, model=found.name, version=found.version,
            weights_digest=found.weights_digest, backend=cls.name,
            backend_version=f"{__version__}/{cls.__module__}", tenant=directive.tenant,
        )

    # -- the last step: a batched call, or a started stream ------------------------------------

    async def _guarded(
        self, found: ModelVersion, model: str, request: InferenceRequest
    ) -> InferenceResult:
        assert found.batcher is not None
        try:
            with found.breaker.acquire():  # 503 + Retry-After while open; records the outcome
                return await self._submit(found, model, request)
        finally:
            self._canaries.roll_back_if_open(found)

    async def _submit(
        self, found: ModelVersion, model: str, request: InferenceRequest
    ) -> InferenceResult:
        assert found.batcher is not None
        timeout_ms = found.spec.batching.timeout_ms
        timeout_s = timeout_ms / 1000.0 if timeout_ms else self._settings.server.request_timeout_s
        timing = BatchTiming()
        try:
            async with asyncio.timeout(timeout_s):
                result = await found.batcher.submit(request, timing=timing)
        except TimeoutError:
            self._record(found, failed=True)
            raise TimeoutError_(f"model {model!r} did not answer within {timeout_s:g}s") from None
        except ModelyardError as exc:
            verdict = counts_as_failure(exc)
            if verdict is not False:  # an admission refusal (queue full) is no answer at all
                self._record(found, failed=bool(verdict))
            raise
        except Exception:
            self._record(found, failed=True)
            raise
        finally:
            self._telemetry.batched(found, timing)
        self._record(found, failed=False)
        self._telemetry.answered(found, result)
        return result

    def _record(self, found: ModelVersion, *, failed: bool) -> None:
        if self._canaries.get(found.name) is None:
            return  # the common case: no canary to judge, nothing to look up
        active = self._registry.entry(found.name).active_version
        self._canaries.record(found, active, failed=failed)

    async def _start_stream(
        self, found: ModelVersion, model: str, request: InferenceRequest
    ) -> AsyncIterator[StreamChunk]:
        backend = found.backend
        assert backend is not None
        # The breaker hears about the start only: for a stream, "slow" is time to first token.
        with found.breaker.acquire():
            chunks = aiter(self._telemetry.observe_stream(found, backend.stream(request)))
            try:
                first = await anext(chunks)
            except StopAsyncIteration:
                first = None
            except ModelyardError:
                raise
            except Exception:
                # The client gets a stable message; the log gets the exception and request id.
                log.exception("stream from %s failed to start", model)
                raise BackendError(f"model {model!r} failed to answer") from None
        return _prepend(first, chunks)


async def _lookup_or_run(
    cache: ResponseCache, key: bytes, run: Callable[[], Awaitable[InferenceResult]], refresh: bool
) -> tuple[InferenceResult, str]:
    return await cache.lookup_or_run(key, run, refresh=refresh)


async def _stream_through(
    cache: ResponseCache, key: bytes,
    start: Callable[[], Awaitable[AsyncIterator[StreamChunk]]], refresh: bool,
) -> tuple[AsyncIterator[StreamChunk], str]:
    return await cache.stream_through(key, start, refresh=refresh)


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
