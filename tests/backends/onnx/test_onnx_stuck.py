"""A run that onnxruntime cannot interrupt stays visible to the engine after a cancel.

The session's ``run`` is patched to wait on a threading.Event, standing in for a native call
that hangs: the tests decide when it returns, and the batcher runs on a FakeClock, so
nothing here waits for a timer.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from modelyard.backends.onnx.backend import OnnxBackend
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.backend import LoadContext
from modelyard.core.batching import Batcher
from modelyard.core.errors import ServiceUnavailableError
from modelyard.core.types import Task, Tensor, TensorRequest, TensorResult
from modelyard.testing import FakeClock

REQUEST = TensorRequest((
    Tensor("X", "FP32", (1, 3), [1.0, 2.0, 3.0]),
    Tensor("IDS", "INT64", (1,), [7]),
))
STUCK_AFTER_S = 5.0


class Gate:
    """Holds every session run until ``release``; counts the runs that started."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()
        self.runs = 0

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real_run = ort.InferenceSession.run

        def held_run(session: Any, *args: Any, **kwargs: Any) -> Any:
            self.runs += 1
            self.entered.set()
            # Bounded, so a failing test cannot leave a thread behind for good.
            assert self.released.wait(timeout=30), "the test never released the run"
            return real_run(session, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, "run", held_run)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "the run never started"


@pytest.fixture
async def gate(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gate]:
    gate = Gate()
    gate.patch(monkeypatch)
    try:
        yield gate
    finally:
        gate.released.set()


@pytest.fixture
async def load_backend(tensor_model: Path) -> AsyncIterator[Callable[..., Any]]:
    loaded: list[OnnxBackend] = []

    async def load(**options: Any) -> OnnxBackend:
        context = LoadContext(
            model="t", version="1", task=Task.TENSOR, source=str(tensor_model),
            path=tensor_model, options=OnnxOptions(**options),
        )
        backend = OnnxBackend(context)
        await backend.load()
        loaded.append(backend)
        return backend

    try:
        yield load
    finally:
        for backend in loaded:
            await backend.unload()


async def _run_callbacks() -> None:
    """Let the event loop run what is already scheduled (no timers): a few passes."""
    for _ in range(20):
        await asyncio.sleep(0)


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll a condition another thread brings about (the run returning), 10 s at most."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def test_a_cancelled_run_that_keeps_running_is_counted_as_stuck(
    gate: Gate, load_backend: Callable[..., Any]
) -> None:
    backend = await load_backend()
    clock = FakeClock()
    told: list[str] = []
    batcher = Batcher(
        backend, max_batch_size=4, max_queue_delay_s=0.0, max_queue_size=8, clock=clock,
        stuck_after_s=STUCK_AFTER_S, on_stuck=told.append,
    )
    batcher.start()
    try:
        caller = asyncio.create_task(batcher.submit(REQUEST))
        await gate.wait_entered()  # the batch is inside onnxruntime now
        caller.cancel()  # its only caller leaves: the engine cancels the backend call
        with pytest.raises(asyncio.CancelledError):
            await caller
        await _run_callbacks()  # a call that gave up its run would have returned by now

        clock.advance(STUCK_AFTER_S)
        assert batcher.stuck_calls == 1
        assert "have not returned" in batcher.unhealthy
        assert told and "have not returned" in told[0]
        with pytest.raises(ServiceUnavailableError, match="is unhealthy"):
            await batcher.submit(REQUEST)

        gate.released.set()  # the native call returns at last: the version serves again
        await _until(lambda: not batcher.unhealthy, "the stuck run to return")
        answer = await asyncio.wait_for(batcher.submit(REQUEST), 10)
        assert isinstance(answer, TensorResult)
        assert {t.name for t in answer.outputs} == {"Y", "COUNT"}
    finally:
        gate.released.set()
        await batcher.stop()


async def test_a_cancelled_batch_still_waiting_for_a_thread_never_runs(
    gate: Gate, load_backend: Callable[..., Any]
) -> None:
    backend = await load_backend(concurrent_runs=1, wide_session=False)  # one thread
    first = asyncio.create_task(backend.infer([REQUEST]))
    await gate.wait_entered()
    second = asyncio.create_task(backend.infer([REQUEST]))  # queued behind the first run
    await asyncio.sleep(0)  # let it reach the thread pool's queue
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(second, 10)  # at once: nothing of it has started

    gate.released.set()
    (result,) = await asyncio.wait_for(first, 10)
    assert isinstance(result, TensorResult)
    assert gate.runs == 1  # the withdrawn batch never reached onnxruntime
