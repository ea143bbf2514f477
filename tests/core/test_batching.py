"""The Batcher: batches form under load, errors and results reach the right callers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from modelyard.core.backend import LoadContext
from modelyard.core.batching import Batcher
from modelyard.core.errors import BackendError, BadRequestError, ServiceUnavailableError
from modelyard.core.types import (
    CompletionRequest,
    EmbeddingRequest,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Task,
)
from modelyard.testing import (
    CountingBackend,
    EchoOptions,
    FakeClock,
    HangingBackend,
    StuckBackend,
)


def _context(**options: Any) -> LoadContext:
    return LoadContext(model="m", version="1", task=Task.COMPLETION, source=".", path=None,
                       options=EchoOptions(**options))


class GatedBackend(CountingBackend):
    """A CountingBackend whose first batch waits for ``gate``: the way to make it busy."""

    name = "gated"

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)
        self.gate = asyncio.Event()
        self.seen: list[list[InferenceRequest]] = []

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.seen.append(list(batch))
        if len(self.seen) == 1:
            await self.gate.wait()
        return await super().infer(batch)


class GatedThenFailing(GatedBackend):
    name = "gated-failing"

    def __init__(self, context: LoadContext, error: Exception) -> None:
        super().__init__(context)
        self.error = error

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        if self.seen:
            self.seen.append(list(batch))
            raise self.error
        return await super().infer(batch)


async def until(condition: Callable[[], bool], *, turns: int = 10_000) -> None:
    """Let the event loop run until ``condition`` holds (no wall-clock time involved)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


@pytest.fixture
async def make_batcher() -> AsyncIterator[Callable[..., Batcher]]:
    made: list[Batcher] = []

    def make(backend: Any, **kwargs: Any) -> Batcher:
        kwargs.setdefault("max_batch_size", 8)
        kwargs.setdefault("max_queue_delay_s", 0.0)
        kwargs.setdefault("max_queue_size", 1024)
        batcher = Batcher(backend, **kwargs)
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.stop()


def _prompt(i: int) -> CompletionRequest:
    return CompletionRequest(f"prompt number {i}")


async def _busy(batcher: Batcher, backend: GatedBackend) -> asyncio.Task[InferenceResult]:
    """Occupy the backend with one request held at the gate."""
    first = asyncio.create_task(batcher.submit(_prompt(-1)))
    await until(lambda: len(backend.seen) == 1)
    return first


async def test_requests_queued_while_busy_form_one_batch(make_batcher: Any) -> None:
    backend = GatedBackend(_context())
    batcher = make_batcher(backend, max_batch_size=8)
    first = await _busy(batcher, backend)

    waiting = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(8)]
    await until(lambda: batcher.depth == 8)
    backend.gate.set()
    results = await asyncio.gather(first, *waiting)

    assert backend.calls == [1, 8]
    assert [r.text for r in results[1:]] == [f"prompt number {i}" for i in range(8)]
    assert batcher.batches_run == 2


async def test_batches_never_exceed_max_batch_size(make_batcher: Any) -> None:
    backend = GatedBackend(_context())
    batcher = make_batcher(backend, max_batch_size=3)
    first = await _busy(batcher, backend)
    waiting = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(8)]
    await until(lambda: batcher.depth == 8)
    backend.gate.set()
    await asyncio.gather(first, *waiting)
    assert backend.calls == [1, 3, 3, 2]


async def test_an_exception_in_a_batch_reaches_every_member(make_batcher: Any) -> None:
    backend = GatedThenFailing(_context(), RuntimeError("device lost"))
    batcher = make_batcher(backend)
    first = await _busy(batcher, backend)
    waiting = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(5)]
    await until(lambda: batcher.depth == 5)
    backend.gate.set()
    await first

    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert [len(b) for b in backend.seen] == [1, 5]
    for outcome in outcomes:
        assert isinstance(outcome, BackendError)
        assert outcome.detail == "model 'm' failed to answer"  # the log has the exception


async def test_a_client_error_from_the_backend_keeps_its_status(make_batcher: Any) -> None:
    backend = GatedThenFailing(_context(), BadRequestError("tensor 'x' is too long"))
    batcher = make_batcher(backend)
    first = await _busy(batcher, backend)
    waiting = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(3)]
    await until(lambda: batcher.depth == 3)
    backend.gate.set()
    await first
    outcomes = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(o, BadRequestError) and o.status_code == 400 for o in outcomes)


class PerItemBackend(CountingBackend):
    """Fails only the prompts that say so, as an Exception instance in the results."""

    name = "per-item"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        results = await super().infer(batch)
        return [
            BadRequestError(f"bad prompt {r.prompt!r}")  # type: ignore[misc]
            if isinstance(r, CompletionRequest) and "bad" in r.prompt else result
            for r, result in zip(batch, results, strict=True)
        ]


async def test_an_exception_for_one_item_reaches_only_that_caller(make_batcher: Any) -> None:
    batcher = make_batcher(PerItemBackend(_context()))
    good, bad = await asyncio.gather(
        batcher.submit(CompletionRequest("fine")), batcher.submit(CompletionRequest("bad one")),
        return_exceptions=True,
    )
    assert isinstance(good, GenerationResult) and good.text == "fine"
    assert isinstance(bad, BadRequestError) and "bad one" in bad.detail


class ShortBackend(CountingBackend):
    name = "short"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        return (await super().infer(batch))[:-1]


async def test_a_backend_returning_too_few_results_fails_the_batch(make_batcher: Any) -> None:
    batcher = make_batcher(ShortBackend(_context()))
    with pytest.raises(BackendError, match="model 'm' returned 0 results for a batch of 1"):
        await batcher.submit(_prompt(0))


async def test_results_reach_the_right_caller_under_1000_concurrent_requests(
    make_batcher: Any,
) -> None:
    backend = CountingBackend(_context(max_batch_size=16))
    batcher = make_batcher(backend, max_batch_size=16)

    async def one(i: int) -> tuple[int, InferenceResult]:
        for _ in range(i % 3):  # stagger arrivals across loop turns
            await asyncio.sleep(0)
        return i, await batcher.submit(_prompt(i))

    answers = await asyncio.gather(*(one(i) for i in range(1000)))

    for i, result in answers:
        assert isinstance(result, GenerationResult)
        assert result.text == f"prompt number {i}"
    assert sum(backend.calls) == 1000
    assert max(backend.calls) <= 16
    assert len(backend.calls) < 1000  # batching actually happened


async def test_a_request_cancelled_while_queued_is_never_executed(make_batcher: Any) -> None:
    backend = GatedBackend(_context())
    batcher = make_batcher(backend)
    first = await _busy(batcher, backend)
    doomed = asyncio.create_task(batcher.submit(CompletionRequest("doomed")))
    kept = asyncio.create_task(batcher.submit(CompletionRequest("kept")))
    await until(lambda: batcher.depth == 2)

    doomed.cancel()
    backend.gate.set()
    await first
    assert (await kept).text == "kept"  # type: ignore[union-attr]
    assert doomed.cancelled()
    executed = [r.prompt for batch in backend.seen for r in batch]  # type: ignore[union-attr]
    assert "doomed" not in executed
    assert executed == ["prompt number -1", "kept"]


async def test_a_full_queue_refuses_at_once_with_retry_after(make_batcher: Any) -> None:
    backend = GatedBackend(_context())
    batcher = make_batcher(backend, max_queue_size=2)
    first = await _busy(batcher, backend)
    queued = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(2)]
    await until(lambda: batcher.depth == 2)

    with pytest.raises(ServiceUnavailableError) as caught:
        await batcher.submit(_prompt(99))
    assert caught.value.status_code == 503
    assert caught.value.headers["Retry-After"] == "1"
    assert "queue full" in caught.value.detail

    backend.gate.set()
    await asyncio.gather(first, *queued)
    assert backend.calls == [1, 2]


async def test_batches_hold_one_task_only(make_batcher: Any) -> None:
    backend = GatedBackend(_context())
    batcher = make_batcher(backend)
    first = await _busy(batcher, backend)
    mixed = [
        CompletionRequest("a"), EmbeddingRequest(("x",)), CompletionRequest("b"),
        EmbeddingRequest(("y",)),
    ]
    waiting = [asyncio.create_task(batcher.submit(r)) for r in mixed]
    await until(lambda: batcher.depth == 4)
    backend.gate.set()
    await asyncio.gather(first, *waiting)
    tasks = [{r.task for r in batch} for batch in backend.seen[1:]]
    assert tasks == [{Task.COMPLETION}, {Task.EMBEDDINGS}]
    assert backend.calls == [1, 2, 2]


async def test_stop_fails_queued_and_in_flight_requests_with_503(make_batcher: Any) -> None:
    backend = GatedBackend(_context())
    batcher = make_batcher(backend)
    in_flight = await _busy(batcher, backend)
    queued = asyncio.create_task(batcher.submit(_prompt(1)))
    await until(lambda: batcher.depth == 1)

    await batcher.stop()

    outcomes = await asyncio.wait_for(
        asyncio.gather(in_flight, queued, return_exceptions=True), timeout=5
    )
    assert all(isinstance(o, ServiceUnavailableError) for o in outcomes), outcomes


# -- max_queue_delay with an injected clock -------------------------------------------------


async def test_a_lone_request_waits_for_company_until_the_clock_passes_the_delay(
    make_batcher: Any, fake_clock: FakeClock
) -> None:
    backend = CountingBackend(_context())
    batcher = make_batcher(backend, max_batch_size=4, max_queue_delay_s=60.0, clock=fake_clock)
    first = asyncio.create_task(batcher.submit(_prompt(0)))
    await until(lambda: batcher.depth == 1)
    for _ in range(50):
        await asyncio.sleep(0)
    assert backend.calls == []  # still waiting for company: the clock has not moved

    fake_clock.advance(60.0)
    second = asyncio.create_task(batcher.submit(_prompt(1)))  # wakes the worker
    await asyncio.gather(first, second)
    assert backend.calls == [2]  # went without waiting for a full batch of 4


async def test_a_full_batch_goes_without_waiting_for_the_delay(
    make_batcher: Any, fake_clock: FakeClock
) -> None:
    backend = CountingBackend(_context())
    batcher = make_batcher(backend, max_batch_size=4, max_queue_delay_s=60.0, clock=fake_clock)
    results = await asyncio.gather(*(batcher.submit(_prompt(i)) for i in range(4)))
    assert len(results) == 4
    assert backend.calls == [4]


async def test_zero_delay_runs_a_lone_request_at_once(
    make_batcher: Any, fake_clock: FakeClock
) -> None:
    backend = CountingBackend(_context())
    batcher = make_batcher(backend, max_batch_size=4, max_queue_delay_s=0.0, clock=fake_clock)
    result = await batcher.submit(_prompt(0))
    assert result.text == "prompt number 0"  # type: ignore[union-attr]
    assert backend.calls == [1]


async def test_a_lone_request_runs_once_the_delay_elapses(make_batcher: Any) -> None:
    """The delay timer itself is a real ``asyncio`` timeout: a fake clock cannot fire it.

    So this one waits (0.02 s) for the real timer; it awaits the result, no sleep oracle.
    """
    backend = CountingBackend(_context())
    batcher = make_batcher(backend, max_batch_size=4, max_queue_delay_s=0.02)
    result = await asyncio.wait_for(batcher.submit(_prompt(0)), timeout=5)
    assert result.text == "prompt number 0"  # type: ignore[union-attr]
    assert backend.calls == [1]


async def test_hanging_backend_holds_until_released(make_batcher: Any) -> None:
    backend = HangingBackend(_context())
    batcher = make_batcher(backend)
    pending = asyncio.create_task(batcher.submit(_prompt(0)))
    await until(lambda: backend.calls == [1])
    assert not pending.done()
    backend.release.set()
    assert (await pending).text == "prompt number 0"  # type: ignore[union-attr]


class HeldBackend(CountingBackend):
    """Every batch waits at the gate; ``held`` counts the calls inside ``infer`` right now."""

    name = "held"

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)
        self.gate = asyncio.Event()
        self.held = 0
        self.most_held = 0

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.held += 1
        self.most_held = max(self.most_held, self.held)
        try:
            await self.gate.wait()
            return await super().infer(batch)
        finally:
            self.held -= 1


@pytest.mark.parametrize("concurrency", [1, 2, 3])
async def test_concurrency_bounds_the_batches_inside_the_backend(
    make_batcher: Any, concurrency: int
) -> None:
    backend = HeldBackend(_context())
    batcher = make_batcher(backend, max_batch_size=4, concurrency=concurrency)
    calls = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(16)]
    await until(lambda: backend.held == concurrency)
    for _ in range(100):  # give any extra worker every chance to start one more batch
        await asyncio.sleep(0)
    assert backend.held == concurrency == batcher.in_flight
    assert batcher.depth == 16 - 4 * concurrency  # each held batch took a full 4

    backend.gate.set()
    results = await asyncio.gather(*calls)
    assert [r.text for r in results] == [f"prompt number {i}" for i in range(16)]
    assert backend.most_held == concurrency
    assert sorted(backend.calls) == [4, 4, 4, 4]
    assert batcher.in_flight == 0


async def test_stop_fails_the_batches_of_every_worker(make_batcher: Any) -> None:
    backend = HeldBackend(_context())
    batcher = make_batcher(backend, max_batch_size=2, concurrency=2)
    calls = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(6)]
    await until(lambda: backend.held == 2)
    await batcher.stop()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, ServiceUnavailableError) for o in outcomes)
    assert backend.calls == []  # nothing finished; everyone heard why


# -- the backend's own limit is a hard cap ------------------------------------------------------


async def test_the_backends_max_batch_size_caps_a_larger_setting(make_batcher: Any) -> None:
    backend = GatedBackend(_context(max_batch_size=3))
    batcher = make_batcher(backend, max_batch_size=8)
    assert batcher.max_batch_size == 3
    first = await _busy(batcher, backend)
    waiting = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(8)]
    await until(lambda: batcher.depth == 8)
    backend.gate.set()
    await asyncio.gather(first, *waiting)
    assert backend.calls == [1, 3, 3, 2]


# -- callers that leave, calls that outlive them ------------------------------------------------


async def _settle(tasks: Sequence[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_caller_that_leaves_gives_its_queue_slot_back_at_once(make_batcher: Any) -> None:
    backend = HangingBackend(_context())
    batcher = make_batcher(backend, max_batch_size=2, max_queue_size=8)
    inside = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(2)]
    await until(lambda: backend.calls == [2])
    queued = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(8)]
    await until(lambda: batcher.depth == 8)
    with pytest.raises(ServiceUnavailableError, match="queue full"):
        await batcher.submit(_prompt(99))

    for task in queued:
        task.cancel()
    await _settle(queued)
    assert batcher.depth == 0  # while the backend still hangs on the first batch
    later = asyncio.create_task(batcher.submit(_prompt(100)))
    await until(lambda: batcher.depth == 1)  # admitted, not "queue full"

    backend.release.set()
    assert len(await asyncio.gather(*inside, later)) == 3
    assert backend.calls == [2, 1]


async def test_a_call_whose_callers_all_left_is_cancelled(make_batcher: Any) -> None:
    backend = HangingBackend(_context())
    batcher = make_batcher(backend, max_batch_size=2)
    inside = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(2)]
    await until(lambda: backend.calls == [2])
    inside[0].cancel()
    await _settle(inside[:1])
    for _ in range(50):
        await asyncio.sleep(0)
    assert batcher.in_flight == 1  # one caller still waits: the call goes on
    inside[1].cancel()
    await _settle(inside)
    await until(lambda: batcher.in_flight == 0)  # nobody waits: the engine stopped waiting

    later = asyncio.create_task(batcher.submit(_prompt(2)))
    await until(lambda: backend.calls == [2, 1])  # the next request reaches the backend
    backend.release.set()
    assert (await later).text == "prompt number 2"  # type: ignore[union-attr]
    assert batcher.stuck_calls == 0 and batcher.unhealthy == ""


async def test_a_call_that_ignores_cancellation_is_stuck_and_the_version_refuses(
    make_batcher: Any, fake_clock: FakeClock
) -> None:
    backend = StuckBackend(_context())
    told: list[str] = []
    batcher = make_batcher(backend, max_batch_size=2, clock=fake_clock, stuck_after_s=10.0,
                           on_stuck=told.append)
    inside = [asyncio.create_task(batcher.submit(_prompt(i))) for i in range(2)]
    await until(lambda: backend.calls == [2])
    for task in inside:
        task.cancel()
    await _settle(inside)
    await until(lambda: backend.ignored_cancels == 1)
    queued = asyncio.create_task(batcher.submit(_prompt(2)))  # waits behind the stuck call
    await until(lambda: batcher.depth == 1)
    fake_clock.advance(9.9)
    assert batcher.unhealthy == "" and told == []

    fake_clock.advance(0.1)
    assert batcher.stuck_calls == 1
    assert "have not returned 10s after they were cancelled" in batcher.unhealthy
    assert told == [batcher.unhealthy]
    with pytest.raises(ServiceUnavailableError, match="model 'm' is unhealthy"):
        await queued  # told at once, not left waiting behind the stuck call
    assert batcher.depth == 0
    with pytest.raises(ServiceUnavailableError, match="unhealthy") as refused:
        await batcher.submit(_prompt(3))
    assert refused.value.headers["Retry-After"]

    backend.release.set()  # the native call returns at last
    await until(lambda: batcher.unhealthy == "")
    assert (await batcher.submit(_prompt(4))).text == "prompt number 4"  # type: ignore[union-attr]
    assert batcher.stuck_calls == 1  # a count of what happened, not of what is
