"""Dynamic batching: requests to one model version queue up and reach the backend together."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

from modelyard.core.batch_timing import BatchRun, BatchTiming
from modelyard.core.errors import (
    BackendError,
    ModelyardError,
    QueueFullError,
    ServiceUnavailableError,
)
from modelyard.core.logs import current_request
from modelyard.core.results import result_mismatch
from modelyard.core.stuck import StuckCalls
from modelyard.core.types import InferenceRequest, InferenceResult, Task

if TYPE_CHECKING:
    from modelyard.core.backend import Backend

__all__ = ["BatchRun", "BatchTiming", "Batcher", "Clock", "background_work"]

Clock = Callable[[], float]
log = logging.getLogger(__name__)

_BACKGROUND: ContextVar[bool] = ContextVar("modelyard_background", default=False)


@contextmanager
def background_work() -> Iterator[None]:
    """Requests submitted inside this block are background work (batch job lines).

    The mark travels with the task's context through the pipeline to ``Batcher.submit``,
    which queues such a request behind every interactive one (see ``Batcher``).
    """
    token = _BACKGROUND.set(True)
    try:
        yield
    finally:
        _BACKGROUND.reset(token)

_Call = asyncio.Task[list[InferenceResult]]


class _Pending:
    __slots__ = ("background", "enqueued_at", "future", "request", "request_id", "timing")

    def __init__(
        self, request: InferenceRequest, future: asyncio.Future[InferenceResult], now: float,
        timing: BatchTiming | None = None, background: bool = False,
    ) -> None:
        self.request = request
        self.future = future
        self.enqueued_at = now
        self.timing = timing
        self.background = background
        # Workers run outside the request's context: keep its id for the log lines they write.
        info = current_request()
        self.request_id = info.request_id if info is not None else None


class Batcher:
    """One queue per model version, drained by ``concurrency`` workers.

    While the backend runs a batch, newcomers queue; the next batch takes up to
    ``max_batch_size`` of them at once (never more than the backend's own
    ``max_batch_size``), so batches grow with load and a lone request on an idle model waits
    at most ``max_queue_delay_s``. With ``concurrency`` > 1 that many batches may be inside
    the backend at once (Triton's instance count): a CPU backend running one single-threaded
    batch per core keeps every core busy without a barrier between them.

    A caller that leaves (timeout, disconnect) gives its queue slot back at once. A backend
    call whose callers have all left is cancelled; one that has not returned
    ``stuck_after_s`` later (a native call that cannot be interrupted) is *stuck*: it is
    counted in ``stuck_calls``, the version turns ``unhealthy`` (``on_stuck`` is told) and
    every request is refused with 503 until the call returns.

    Background requests (submitted inside ``background_work()``: batch job lines) queue
    apart and never go before an interactive one. A batch with interactive requests takes
    background ones into the slots it leaves free, at most ``background_share`` of
    ``max_batch_size`` (at least one); background requests run a batch of their own, a full
    one, only once interactive traffic has been quiet for ``background_idle_s`` (nothing
    interactive queued or inside the backend): an interactive request then waits at most for
    one call already running. A background request that has waited
    ``background_max_wait_s`` ages into the interactive queue at its arrival time, so a job
    still moves while interactive batches are full.
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
        model: str | None = None,
        stuck_after_s: float = 5.0,
        on_stuck: Callable[[str], None] | None = None,
        background_share: float = 0.25,
        background_idle_s: float = 0.05,
        background_max_wait_s: float = 1.0,
    ) -> None:
        self._backend = backend
        #: The model name errors and log lines speak of.
        self.model = model if model is not None else backend.context.model
        #: Called after every backend call (metrics: batch size, call duration).
        self._on_batch = on_batch
        self.refill_wait_s = refill_wait_s
        self.concurrency = max(1, concurrency)
        # The backend's own limit is a hard cap: it says ``infer`` accepts no more.
        self.max_batch_size = max(1, min(max_batch_size, backend.max_batch_size))
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_size = max_queue_size
        self._on_stuck = on_stuck
        self._clock = clock
        #: Calls cancelled because their callers left, and those that never returned.
        self.stuck = StuckCalls(
            self.model, clock=clock, stuck_after_s=stuck_after_s, on_stuck=self._became_stuck
        )
        #: Background requests a batch with interactive ones may take, at most.
        self.background_slots = max(1, int(self.max_batch_size * background_share))
        self.background_idle_s = background_idle_s
        self.background_max_wait_s = background_max_wait_s
        self._queue: collections.deque[_Pending] = collections.deque()
        self._background: collections.deque[_Pending] = collections.deque()
        #: When interactive traffic was last seen (queued, or a batch of it finished), and
        #: how many batches with interactive requests are inside the backend now.
        self._interactive_at = -float("inf")
        self._interactive_busy = 0
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self.batches_run = 0
        #: Batches inside the backend right now (at most ``concurrency``).
        self.in_flight = 0
        #: The batches inside the backend now, for ``drain``.
        self._executing: dict[int, list[_Pending]] = {}

    @property
    def depth(self) -> int:
        """Interactive requests waiting now (those that left are gone at once); background
        requests that aged into the interactive queue count here."""
        return len(self._queue)

    @property
    def background_depth(self) -> int:
        """Background requests (batch job lines) waiting behind the interactive queue."""
        return len(self._background)

    @property
    def stuck_after_s(self) -> float:
        """How long a cancelled backend call may take to return before it counts as stuck."""
        return self.stuck.stuck_after_s

    @property
    def stuck_calls(self) -> int:
        """Backend calls so far that did not return after they were cancelled."""
        self.stuck.check()
        return self.stuck.total

    @property
    def unhealthy(self) -> str:
        """Why the version refuses requests now ('' while it is healthy)."""
        return self.stuck.reason

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
        self.stuck.close()
        self._fail_queued(ServiceUnavailableError("model version is unloading"))

    async def drain(self, timeout_s: float) -> None:
        """Wait, ``timeout_s`` at most, until the requests queued or inside the backend now
        have their answers: a version taken out of service finishes them before it stops."""
        held = [*self._queue, *self._background,
                *(p for batch in self._executing.values() for p in batch)]
        waiting = [p.future for p in held if not p.future.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout_s)

    async def submit(
        self, request: InferenceRequest, *, timing: BatchTiming | None = None
    ) -> InferenceResult:
        """Queue a request and wait for its own result (or its own share of a batch error)."""
        reason = self.unhealthy
        if reason:
            raise self._unhealthy_error(reason)
        background = _BACKGROUND.get()
        queue = self._background if background else self._queue
        if len(queue) >= self.max_queue_size:
            raise QueueFullError(
                f"queue full ({self.max_queue_size} waiting); retry shortly", retry_after=1
            )
        future: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        if timing is not None:
            timing.enqueued_ns = time.time_ns()
        now = self._clock()
        pending = _Pending(request, future, now, timing, background)
        queue.append(pending)
        if not background:
            self._interactive_at = now
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            # The caller left (timeout, disconnect): its slot is free now, not when a worker
            # would have reached it (never, behind a hung backend).
            self._discard(pending)
            raise

    def _discard(self, pending: _Pending) -> None:
        for queue in (self._queue, self._background):
            try:
                queue.remove(pending)
            except ValueError:
                continue  # not (or no longer) in this queue
            return

    async def _run(self) -> None:
        last_batch = 0  # per worker: what this worker's interactive callers will send back
        while True:
            if self._background:
                self._age_background()
            if self._queue:
                await self._wait_for_company()
                await self._wait_for_refill(last_batch)
            elif not self._background_may_run():
                await self._wait_for_work()
                continue
            batch, interactive = self._take_batch()
            if batch:
                last_batch = interactive
                await self._run_batch(batch, interactive)

    async def _run_batch(self, batch: list[_Pending], interactive: int) -> None:
        self.in_flight += 1
        self._interactive_busy += interactive > 0
        self._executing[id(batch)] = batch
        try:
            await self._execute(batch)
        finally:
            self.in_flight -= 1
            del self._executing[id(batch)]
            if interactive:
                self._interactive_busy -= 1
                self._interactive_at = self._clock()
                if self._background:
                    self._wakeup.set()  # an idle worker may now count the quiet from here

    # -- background requests ------------------------------------------------------------------

    def _age_background(self) -> None:
        """Move the background requests that waited ``background_max_wait_s`` into the
        interactive queue, each at its arrival time (behind those that came before it)."""
        now = self._clock()
        while self._background and self._aged_at(self._background[0]) <= now:
            aged = self._background.popleft()
            at = len(self._queue)
            while at > 0 and self._queue[at - 1].enqueued_at > aged.enqueued_at:
                at -= 1
            self._queue.insert(at, aged)

    def _aged_at(self, pending: _Pending) -> float:
        return pending.enqueued_at + self.background_max_wait_s

    def _quiet_at(self) -> float:
        """When interactive traffic will have been quiet long enough for background alone."""
        return self._interactive_at + self.background_idle_s

    def _background_may_run(self) -> bool:
        """Whether a batch of background requests alone may start now."""
        return (
            bool(self._background)
            and not self._interactive_busy
            and self._clock() >= self._quiet_at()
        )

    async def _wait_for_work(self) -> None:
        """Wait for a request, or until waiting background requests may run or age."""
        self._wakeup.clear()
        if not self._background:
            await self._wakeup.wait()
            return
        # The same sums as the checks above, so that a deadline reached is a check passed.
        due = self._aged_at(self._background[0])
        if not self._interactive_busy:
            due = min(due, self._quiet_at())
        remaining = due - self._clock()
        if remaining <= 0:
            return
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout=remaining)
        except TimeoutError:
            return

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

    def _take_batch(self) -> tuple[list[_Pending], int]:
        """Interactive requests first, then background ones in the slots left; the batch and
        how many interactive requests it holds."""
        batch: list[_Pending] = []
        task = self._take_from(self._queue, batch, None)
        interactive = sum(1 for p in batch if not p.background)
        if len(batch) < self.max_batch_size and self._background:
            room = self.max_batch_size
            if interactive:
                room = min(room, len(batch) + self.background_slots)
            self._take_from(self._background, batch, task, room)
        return batch, interactive

    def _take_from(
        self, queue: collections.deque[_Pending], batch: list[_Pending], task: Task | None,
        room: int | None = None,
    ) -> Task | None:
        """Move requests of one task from ``queue`` into ``batch`` while it has room."""
        skipped: list[_Pending] = []
        room = self.max_batch_size if room is None else room
        while queue and len(batch) < room:
            pending = queue.popleft()
            if pending.future.done():  # cancelled while queued: never executed
                continue
            if task is None:
                task = pending.request.task
            if pending.request.task != task:
                skipped.append(pending)
                continue
            batch.append(pending)
        queue.extendleft(reversed(skipped))
        return task

    # -- one backend call ----------------------------------------------------------------------

    async def _execute(self, batch: list[_Pending]) -> None:
        self.batches_run += 1
        run = BatchRun(len(batch))
        started = self._clock()
        for pending in batch:
            if pending.timing is not None:
                pending.timing.queue_wait_s = started - pending.enqueued_at
                pending.timing.batch = run
        requests = [p.request for p in batch]
        call = asyncio.get_running_loop().create_task(self._call(requests, run, started))
        watcher = self._abandon_when_all_leave(batch, call)
        try:
            # Not ``await call``: a call cancelled because its callers left must not look
            # like this worker being cancelled.
            await asyncio.wait((call,))
        except asyncio.CancelledError:
            # stop() cancelled the worker mid-batch: these callers are no longer queued, so
            # only this says they will get no answer (else they wait out the request timeout).
            call.cancel()
            self._fail_all(batch, ServiceUnavailableError("model version is unloading"))
            raise
        for pending in batch:  # answering them must not wake the watcher for nothing
            pending.future.remove_done_callback(watcher)
        if call.cancelled():  # abandoned (nobody is left to answer) or cancelled by itself
            self._fail_all(batch, self._failed())
            return
        error = call.exception()
        if error is not None:
            self._fail_batch(batch, error)
            return
        self._deliver(batch, call.result())

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

    def _fail_batch(self, batch: list[_Pending], error: BaseException) -> None:
        if isinstance(error, ModelyardError):
            self._fail_all(batch, error)
            return
        # Every member must hear about it; only the log learns what it was.
        log.error(
            "backend of model %r failed a batch of %d", self.model, len(batch),
            exc_info=error, extra={"request_ids": _ids(batch)},
        )
        self._fail_all(batch, self._failed())

    def _deliver(self, batch: list[_Pending], results: list[InferenceResult]) -> None:
        if len(results) != len(batch):
            log.error(
                "backend of model %r returned %d results for a batch of %d", self.model,
                len(results), len(batch), extra={"request_ids": _ids(batch)},
            )
            self._fail_all(batch, BackendError(
                f"model {self.model!r} returned {len(results)} results for a batch of "
                f"{len(batch)}"
            ))
            return
        for pending, result in zip(batch, results, strict=True):
            if pending.future.done():
                continue
            checked = self._checked(pending, result)
            if isinstance(checked, BaseException):
                pending.future.set_exception(checked)
            else:
                pending.future.set_result(checked)

    def _checked(
        self, pending: _Pending, result: InferenceResult | BaseException
    ) -> InferenceResult | Exception:
        """``result`` if it answers ``pending``'s request, else the error its caller gets."""
        if isinstance(result, ModelyardError):
            return result
        if isinstance(result, BaseException):
            log.error("backend of model %r failed one request", self.model, exc_info=result,
                      extra={"request_ids": _ids([pending])})
            return self._failed()
        problem = result_mismatch(pending.request, result)
        if not problem:
            return result
        log.error("backend of model %r returned %s", self.model, problem,
                  extra={"request_ids": _ids([pending])})
        return BackendError(f"model {self.model!r} returned {problem}")

    def _failed(self) -> BackendError:
        return BackendError(f"model {self.model!r} failed to answer")

    @staticmethod
    def _fail_all(batch: list[_Pending], exc: Exception) -> None:
        for pending in batch:
            if not pending.future.done():
                pending.future.set_exception(exc)

    def _fail_queued(self, exc: Exception) -> None:
        for queue in (self._queue, self._background):
            while queue:
                pending = queue.popleft()
                if not pending.future.done():
                    pending.future.set_exception(exc)

    # -- calls that outlive their callers ------------------------------------------------------

    def _abandon_when_all_leave(
        self, batch: list[_Pending], call: _Call
    ) -> Callable[[asyncio.Future[InferenceResult]], None]:
        """Cancel ``call`` once every member of its batch has gone; returns the watcher."""
        left = len(batch)

        def one_gone(_: asyncio.Future[InferenceResult]) -> None:
            nonlocal left
            left -= 1
            if left == 0 and not call.done():
                self.stuck.abandon(call)

        for pending in batch:
            pending.future.add_done_callback(one_gone)
        return one_gone

    def _became_stuck(self, reason: str) -> None:
        log.error("model %r is unhealthy: %s; refusing its requests until they return",
                  self.model, reason)
        self._fail_queued(self._unhealthy_error(reason))
        if self._on_stuck is not None:
            try:
                self._on_stuck(reason)
            except Exception:  # an observer must never break the batcher
                log.exception("on_stuck callback of model %r raised", self.model)

    def _unhealthy_error(self, reason: str) -> ServiceUnavailableError:
        return ServiceUnavailableError(
            f"model {self.model!r} is unhealthy: {reason}; retry later", retry_after=5
        )


def _ids(batch: list[_Pending]) -> list[str]:
    return [p.request_id for p in batch if p.request_id is not None]
