"""Background requests (batch job lines) queue behind interactive ones in the same batcher."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from modelyard.core.backend import LoadContext
from modelyard.core.batching import Batcher, background_work
from modelyard.core.types import CompletionRequest, InferenceRequest, InferenceResult, Task
from modelyard.testing import CountingBackend, EchoOptions, FakeClock


class GatedBackend(CountingBackend):
    """Records each batch's prompts; its first call waits for ``gate`` (to make it busy)."""

    name = "gated-priority"

    def __init__(self) -> None:
        super().__init__(LoadContext(model="m", version="1", task=Task.COMPLETION, source=".",
                                     path=None, options=EchoOptions()))
        self.gate = asyncio.Event()
        self.seen: list[list[str]] = []

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.seen.append([r.prompt for r in batch if isinstance(r, CompletionRequest)])
        if len(self.seen) == 1:
            await self.gate.wait()
        return await super().infer(batch)


async def until(condition: Callable[[], bool], *, turns: int = 10_000) -> None:
    """Let the event loop run until ``condition`` holds (no wall-clock time involved)."""
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def spin(turns: int = 200) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


@pytest.fixture
async def make_batcher() -> AsyncIterator[Callable[..., Batcher]]:
    made: list[Batcher] = []

    def make(backend: Any, **kwargs: Any) -> Batcher:
        kwargs.setdefault("max_queue_delay_s", 0.0)
        kwargs.setdefault("max_queue_size", 64)
        batcher = Batcher(backend, **kwargs)
        batcher.start()
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        await batcher.stop()


def interactive(batcher: Batcher, name: str) -> asyncio.Task[InferenceResult]:
    return asyncio.create_task(batcher.submit(CompletionRequest(name)))


def background(batcher: Batcher, name: str) -> asyncio.Task[InferenceResult]:
    with background_work():  # the task copies the context, mark included
        return asyncio.create_task(batcher.submit(CompletionRequest(name)))


async def test_interactive_requests_go_first_and_background_fills_the_slots_left(
    make_batcher: Any,
) -> None:
    backend = GatedBackend()
    batcher = make_batcher(backend, max_batch_size=3, background_idle_s=0.0)
    busy = interactive(batcher, "busy")
    await until(lambda: len(backend.seen) == 1)
    queued = [background(batcher, f"b{i}") for i in range(3)]
    queued += [interactive(batcher, "i0"), interactive(batcher, "i1")]
    await until(lambda: batcher.depth == 2 and batcher.background_depth == 3)

    backend.gate.set()
    await asyncio.gather(busy, *queued)
    # Arrival order was b0 b1 b2 i0 i1: the interactive ones still lead the next batch.
    assert backend.seen[1:] == [["i0", "i1", "b0"], ["b1", "b2"]]


async def test_background_takes_at_most_its_share_of_a_batch_with_interactive_requests(
    make_batcher: Any,
) -> None:
    backend = GatedBackend()
    batcher = make_batcher(backend, max_batch_size=8, background_share=0.25,
                           background_idle_s=0.0)
    assert batcher.background_slots == 2
    busy = interactive(batcher, "busy")
    await until(lambda: len(backend.seen) == 1)
    queued = [background(batcher, f"b{i}") for i in range(6)] + [interactive(batcher, "i0")]
    await until(lambda: batcher.depth == 1 and batcher.background_depth == 6)

    backend.gate.set()
    await asyncio.gather(busy, *queued)
    # Two of the eight slots ride along; once no interactive request waits, a full batch.
    assert backend.seen[1:] == [["i0", "b0", "b1"], ["b2", "b3", "b4", "b5"]]


async def test_background_alone_waits_until_interactive_traffic_is_quiet(
    make_batcher: Any, fake_clock: FakeClock
) -> None:
    backend = GatedBackend()
    backend.gate.set()
    batcher = make_batcher(backend, max_batch_size=8, clock=fake_clock,
                           background_idle_s=0.05, background_max_wait_s=60.0)
    await interactive(batcher, "i0")  # answered just now (by the fake clock)
    first = background(batcher, "b0")
    await spin()
    assert backend.seen == [["i0"]]  # an interactive caller may be back any moment

    fake_clock.advance(0.03)
    await interactive(batcher, "i1")  # b0 rides along in the free slots
    assert backend.seen[1] == ["i1", "b0"]
    await first

    second = background(batcher, "b1")
    fake_clock.advance(0.049)
    third = background(batcher, "b2")  # wakes the worker: still not quiet long enough
    await spin()
    assert backend.seen[2:] == []

    fake_clock.advance(0.002)
    fourth = background(batcher, "b3")  # wakes the worker: quiet for 0.05 s now
    await asyncio.gather(second, third, fourth)
    assert backend.seen[2:] == [["b1", "b2", "b3"]]


async def test_a_background_request_that_waited_max_wait_goes_in_arrival_order(
    make_batcher: Any, fake_clock: FakeClock
) -> None:
    backend = GatedBackend()
    batcher = make_batcher(backend, max_batch_size=1, clock=fake_clock,
                           background_idle_s=0.0, background_max_wait_s=5.0)
    busy = interactive(batcher, "busy")
    await until(lambda: len(backend.seen) == 1)
    old = background(batcher, "b-old")
    await until(lambda: batcher.background_depth == 1)
    fake_clock.advance(4.0)
    young = background(batcher, "b-young")
    fake_clock.advance(1.0)
    late = interactive(batcher, "i-late")
    await until(lambda: batcher.depth == 1 and batcher.background_depth == 2)
    fake_clock.advance(0.5)  # b-old has waited 5.5 s, b-young 1.5 s

    backend.gate.set()
    await asyncio.gather(busy, old, young, late)
    assert backend.seen[1:] == [["b-old"], ["i-late"], ["b-young"]]


async def test_a_background_request_that_leaves_is_never_executed(make_batcher: Any) -> None:
    backend = GatedBackend()
    batcher = make_batcher(backend, max_batch_size=4, background_idle_s=0.0)
    busy = interactive(batcher, "busy")
    await until(lambda: len(backend.seen) == 1)
    gone, kept = background(batcher, "gone"), background(batcher, "kept")
    await until(lambda: batcher.background_depth == 2)
    gone.cancel()
    await until(lambda: batcher.background_depth == 1)  # its slot is back at once

    backend.gate.set()
    await asyncio.gather(busy, kept)
    assert backend.seen[1:] == [["kept"]]


async def test_stop_fails_waiting_background_requests(make_batcher: Any) -> None:
    backend = GatedBackend()
    batcher = make_batcher(backend, max_batch_size=4)
    busy = interactive(batcher, "busy")
    await until(lambda: len(backend.seen) == 1)
    waiting = background(batcher, "b0")
    await until(lambda: batcher.background_depth == 1)
    await batcher.stop()
    outcomes = await asyncio.gather(busy, waiting, return_exceptions=True)
    assert all(isinstance(o, Exception) for o in outcomes), outcomes
