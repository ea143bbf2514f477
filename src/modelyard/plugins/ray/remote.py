"""``RayBackend``: the ingress's stand-in for a version whose replicas run in Ray Serve.

Calls go through the version's deployment handle; Serve picks the replica. A call that dies
with its replica (SIGKILL, a crash) is sent again, to another replica once Serve knows: an
inference is idempotent, and a stream is retried only before its first chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import msgspec

from modelyard.core.backend import BackendInfo, HealthReport, LoadContext
from modelyard.core.cluster import ReplicaBackend
from modelyard.core.errors import ServiceUnavailableError
from modelyard.core.tracing import Tracing
from modelyard.core.types import InferenceRequest, InferenceResult, StreamChunk, Task
from modelyard.plugins.ray.replica import Failure, ReplicaFacts, error_from

__all__ = ["RayBackend", "RETRIES"]

log = logging.getLogger(__name__)

#: Attempts for a call whose replica died; the waits between them grow from 50 ms.
RETRIES = 6
_FIRST_WAIT_S = 0.05


def _replica_lost() -> tuple[type[BaseException], ...]:
    from ray import exceptions

    return (exceptions.RayActorError, exceptions.WorkerCrashedError)


class RayBackend(ReplicaBackend):
    """Forwards ``infer`` and ``stream`` to a Serve deployment's replicas."""

    name = "ray"

    def __init__(
        self, context: LoadContext, handle: Any, facts: ReplicaFacts, *,
        health: Callable[[], Awaitable[HealthReport]],
        release: Callable[[], Awaitable[None]], concurrency: int,
    ) -> None:
        super().__init__(context)
        self._handle = handle
        self._stream_handle = handle.options(stream=True)
        self._facts = facts
        self._health = health
        self._release = release
        self.task = Task(facts.task)
        self.max_batch_size = facts.max_batch_size
        #: The ingress's batches in flight at once: enough to keep every replica busy.
        self.concurrent_batches = concurrency
        self.weights_digest = facts.weights_digest or None
        #: Calls sent again because their replica died (a metric for the operator).
        self.retried = 0

    @property
    def supports_streaming(self) -> bool:
        return self._facts.supports_streaming

    async def unload(self) -> None:
        await self._release()

    async def health(self) -> HealthReport:
        return await self._health()

    def info(self) -> BackendInfo:
        return msgspec.convert(self._facts.info, BackendInfo)

    def memory_bytes(self) -> int:
        return self._facts.memory_bytes

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        carrier = Tracing.carrier()
        lost = _replica_lost()
        wait = _FIRST_WAIT_S
        for attempt in range(RETRIES):
            try:
                outcomes = await self._handle.infer.remote(list(batch), carrier)
                break
            except lost:
                if attempt == RETRIES - 1:
                    raise ServiceUnavailableError(
                        f"no replica of {self.context.model!r} answered; retry shortly",
                        retry_after=1,
                    ) from None
                self.retried += 1
                log.warning("a replica of %s died mid-call; sending it again",
                            self.context.model)
                await asyncio.sleep(wait)
                wait *= 2
        for outcome in outcomes:
            if isinstance(outcome, Failure):
                raise error_from(outcome)
        return list(outcomes)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        carrier = Tracing.carrier()
        lost = _replica_lost()
        wait = _FIRST_WAIT_S
        for attempt in range(RETRIES):
            chunks = self._stream_handle.stream.remote(request, carrier)
            started = False
            try:
                async for chunk in chunks:
                    started = True
                    if isinstance(chunk, Failure):
                        raise error_from(chunk)
                    yield chunk
                return
            except lost:
                if started or attempt == RETRIES - 1:
                    raise ServiceUnavailableError(
                        f"the replica of {self.context.model!r} serving this stream died",
                        retry_after=1,
                    ) from None
                self.retried += 1
                await asyncio.sleep(wait)
                wait *= 2
            finally:
                chunks.cancel()  # a client gone: the replica's generation stops too
