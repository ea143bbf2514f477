"""``StuckCalls``: backend calls cancelled because every caller left, and those that hang on."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

__all__ = ["StuckCalls"]

log = logging.getLogger(__name__)

_Call = asyncio.Task[Any]


class StuckCalls:
    """Watches abandoned calls; one that has not returned ``stuck_after_s`` after it was
    cancelled (a native call that cannot be interrupted) is *stuck* until it returns.

    ``on_stuck(reason)`` is told each time calls become stuck; time is the injected clock's.
    """

    def __init__(
        self,
        model: str,
        *,
        clock: Callable[[], float],
        stuck_after_s: float,
        on_stuck: Callable[[str], None],
    ) -> None:
        self._model = model
        self._clock = clock
        self.stuck_after_s = stuck_after_s
        self._on_stuck = on_stuck
        # Calls cancelled because every caller left: when, and the timer that checks on them.
        self._abandoned: dict[_Call, tuple[float, asyncio.TimerHandle]] = {}
        self._stuck: set[_Call] = set()
        #: Calls so far that became stuck.
        self.total = 0

    @property
    def reason(self) -> str:
        """Why the version is unhealthy now ('' while no call is stuck)."""
        self.check()
        if not self._stuck:
            return ""
        return (
            f"{len(self._stuck)} backend call(s) have not returned {self.stuck_after_s:g}s "
            "after they were cancelled"
        )

    def abandon(self, call: _Call) -> None:
        """Cancel ``call`` (nobody waits for it any more) and watch whether it returns."""
        log.info("model %r: every caller of a backend call left; cancelling it", self._model)
        call.cancel()
        timer = asyncio.get_running_loop().call_later(self.stuck_after_s, self.check)
        self._abandoned[call] = (self._clock(), timer)
        call.add_done_callback(self._returned)

    def check(self) -> None:
        """Declare stuck the abandoned calls that outlived ``stuck_after_s``."""
        if not self._abandoned:
            return
        now = self._clock()
        late = [c for c, (since, _) in self._abandoned.items() if now - since >= self.stuck_after_s]
        if not late:
            return
        for call in late:
            self._abandoned.pop(call)[1].cancel()
            self._stuck.add(call)
        self.total += len(late)
        self._on_stuck(self.reason)

    def close(self) -> None:
        for _, timer in self._abandoned.values():
            timer.cancel()

    def _returned(self, call: _Call) -> None:
        entry = self._abandoned.pop(call, None)
        if entry is not None:
            entry[1].cancel()
        if not call.cancelled():
            call.exception()  # retrieved: a late failure of an abandoned call is not news
        if call in self._stuck:
            self._stuck.discard(call)
            log.warning("model %r: a stuck backend call returned (%d still stuck)", self._model,
                        len(self._stuck))
