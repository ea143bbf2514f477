"""Dynamic batching: requests to one model version queue up and reach the backend together."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from modelyard.core.errors import BackendError, ModelyardError, ServiceUnavailableError
from modelyard.core.types import InferenceRequest, InferenceResult

if TYPE_CHECKING:
    from modelyard.core.backend import Backend

__all__ = ["BatchRun", "BatchTiming", "Batcher", "Clock"]

Clock = Callable[[], float]
log = logging.getLogger(__name__)


class BatchRun:
    """One backend call: its size, wall-clock bounds (for spans) and duration (batcher clock)."""

    __slots__ = ("failed", "finished_ns", "seconds", "size", "started_ns")

    def __init__(self, size: int) -> None:
        self.size = size
        self.started_ns = time.time_ns()
        self.finished_ns = 0
        self.seconds = 0.0
        self.failed = False


class BatchTiming:
    """What the batcher did with one request; given to ``submit`` by a caller that observes."""

    __slots__ = ("batch", "enqueued_ns", "queue_wait_s")

    def __init__(self) -> None:
        self.enqueued_ns = 0
        self.queue_wait_s: float | None = None
        self.batch: BatchRun | None = None


class _Pending:
    __slots__ = ("enqueued_at", "future", "request", "timing")

    def __init__(
        self, request: InferenceRequest, future: asyncio.Future[InferenceResult], now: float,
        timing: BatchTiming | None = None,
    ) -> None:
        self.request = request
        self.future = future
        self.enqueued_at = now
        self.timing = timing


class Batcher:
    """One queue per model version, drained by ``concurrency`` workers.

    While the backend runs a batch, newcomers queue; the next batch takes up to
    ``max_batch_size`` of them at once, so batches grow with load and a lone request on an
    idle model waits at most ``max_queue_delay_s``. With ``concurrency`` > 1 that many batches
    may be inside the backend at once (Triton's instance count): a CPU backend running one
    single-threaded batch per core keeps every core busy without a barrier between them.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int,
        max_queue_delay_s: float,
        max_queue_size: int,
        refill_wait_s: float = 0.0,
        concurrency: int = 1,
        clock: Clock = time.monotonic,
        on_batch: Callable[[BatchRun], None] | None = None,
    ) -> None:
        self._backend = backend
        #: Called after every backend call (metrics: batch size, call duration).
        self._on_batch = on_batch
        self.refill_wait_s = refill_wait_s
        self.concurrency = max(1, concurrency)
        self.max_batch_size = max(1, max_batch_size)
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._clock = clock
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self.batches_run = 0
        #: Batches inside the backend right now (at most ``concurrency``).
        self.in_flight = 0

    @property
    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if not self._workers:
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._run(), name=f"batcher-{i}") for i in range(self.concurrency)
            ]

    async def stop(self) -> None:
        """Stop the workers; whatever still waits fails with 503."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.cancel()
        for worker in workers:
            try:
                await worker
            except asyncio.CancelledError:
                pass
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ServiceUnavailableError("model version is unloading"))

    async def submit(
        self, request: InferenceRequest, *, timing: BatchTiming | None = None
    ) -> InferenceResult:
        """Queue a request and wait for its own result (or its own share of a batch error)."""
        if len(self._queue) >= self.max_queue_size:
            raise ServiceUnavailableError(
                f"queue full ({self.max_queue_size} waiting); retry shortly", retry_after=1
            )
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        if timing is not None:
            timing.enqueued_ns = time.time_ns()
        self._queue.append(_Pending(request, future, self._clock(), timing))
        self._wakeup.set()
        # A caller that is cancelled (timeout, disconnect) cancels its future: the worker skips it.
        return await future

    async def _run(self) -> None:
        last_batch = 0  # per worker: what this worker's callers will send back
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            await self._wait_for_refill(last_batch)
            batch = self._take_batch()
            if batch:
                last_batch = len(batch)
                self.in_flight += 1
                try:
                    await self._execute(batch)
                finally:
                    self.in_flight -= 1

    async def _wait_for_company(self) -> None:
        if self.max_queue_delay_s <= 0 or len(self._queue) >= self.max_batch_size:
            return
        await self._wait_for_depth(
            self.max_batch_size, self._queue[0].enqueued_at + self.max_queue_delay_s
        )

    async def _wait_for_refill(self, last_batch: int) -> None:
        """After a batch of k, briefly wait for k requests before running fewer.

        Under steady load the callers of the last batch send their next requests a moment
        after their answers leave; starting at once would split them into a small batch and a
        large one. An idle model pays nothing: this only waits while some requests are queued.
        """
        target = min(last_batch, self.max_batch_size)
        if self.refill_wait_s <= 0 or not self._queue or len(self._queue) >= target:
            return
        await self._wait_for_depth(target, self._clock() + self.refill_wait_s)

    async def _wait_for_depth(self, depth: int, deadline: float) -> None:
        """Wait until ``depth`` requests queue or the clock passes ``deadline``."""
        while len(self._queue) < depth:
            remaining = deadline - self._clock()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        task = None
        skipped: list[_Pending] = []
        while self._queue and len(batch) < self.max_batch_size:
            pending = self._queue.popleft()
            if pending.future.done():  # cancelled while queued: never executed
                continue
            if task is None:
                task = pending.request.task
            if pending.request.task != task:
                skipped.append(pending)
                continue
            batch.append(pending)
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _execute(self, batch: list[_Pending]) -> None:
        self.batches_run += 1
        run = BatchRun(len(batch))
        started = self._clock()
        for pending in batch:
            if pending.timing is not None:
                pending.timing.queue_wait_s = started - pending.enqueued_at
                pending.timing.batch = run
        requests = [p.request for p in batch]
        try:
            results = await self._call(requests, run, started)
            if len(results) != len(requests):
                raise BackendError(
                    f"backend returned {len(results)} results for a batch of {len(requests)}"
                )
        except asyncio.CancelledError:
            # stop() cancelled the worker mid-batch: these callers are no longer queued, so
            # only this says they will get no answer (else they wait out the request timeout).
            self._fail_all(batch, ServiceUnavailableError("model version is unloading"))
            raise
        except ModelyardError as exc:
            self._fail_all(batch, exc)
            return
        except Exception as exc:  # every member must hear about it
            log.exception("backend %r failed a batch of %d", self._backend.name, len(batch))
            self._fail_all(batch, BackendError(f"backend failed: {type(exc).__name__}: {exc}"))
            return
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            if isinstance(result, BaseException):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)

    async def _call(
        self, requests: list[InferenceRequest], run: BatchRun, started: float
    ) -> list[InferenceResult]:
        try:
            return await self._backend.infer(requests)
        except BaseException:
            run.failed = True
            raise
        finally:
            run.seconds, run.finished_ns = self._clock() - started, time.time_ns()
            if self._on_batch is not None:
                self._on_batch(run)

    @staticmethod
    def _fail_all(batch: list[_Pending], exc: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)
