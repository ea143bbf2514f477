"""What the batcher records about its calls and requests, for metrics and spans."""

from __future__ import annotations

import time

__all__ = ["BatchRun", "BatchTiming"]


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
