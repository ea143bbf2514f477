"""How long a coroutine keeps the event loop from running anything else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["largest_loop_gap"]


async def largest_loop_gap(
    work: Callable[[], Awaitable[Any]], *, tick_s: float = 0.002
) -> float:
    """Seconds of the longest stretch in which a ticker task could not run while ``work`` ran.

    A ticker sleeps ``tick_s`` at a time and notes when it wakes; a gap much longer than
    ``tick_s`` means something held the loop (a blocking call in a coroutine).
    """
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.perf_counter())
            await asyncio.sleep(tick_s)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)  # the ticker takes its first reading before the work starts
    try:
        await work()
        finished = time.perf_counter()
        # One reading after the work ended closes the last gap (a call that blocked and
        # then returned without awaiting anything).
        while ticks[-1] < finished:
            await asyncio.sleep(tick_s)
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    return max((b - a for a, b in zip(ticks, ticks[1:], strict=False)), default=0.0)
