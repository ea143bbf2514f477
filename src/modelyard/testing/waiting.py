"""``wait_until``: a bounded poll of a real condition (a live server's state), for tests.

Not for timers: time-dependent logic takes an injected clock (``FakeClock``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["wait_until"]


def wait_until(
    predicate: Callable[[], bool], what: str, *, timeout: float = 30.0, interval: float = 0.01
) -> None:
    """Return once ``predicate()`` holds; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)
