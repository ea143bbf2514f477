"""A circuit breaker per model version, with resilience4j's count-based semantics.

CLOSED records the outcome of the last ``window_size`` calls; once ``minimum_calls`` are in the
window and the failure rate or the slow-call rate reaches its threshold, the breaker OPENs and
refuses calls without touching the backend. After ``wait_in_open_ms`` (growing by
``wait_in_open_multiplier`` on each consecutive opening, up to ``max_wait_in_open_ms``) it goes
HALF_OPEN and admits exactly ``permitted_calls_in_half_open`` probes; their outcomes decide
between CLOSED and OPEN again.

Client errors (4xx), cancellations and admission refusals (a full queue, draining: errors
whose ``counts_as_failure`` is False) are neither failures nor calls: the permit is released
and the window does not move. The breaker is driven from the event loop; it never awaits, so
checking the half-open quota and taking a permit cannot interleave with another task.

pybreaker, aiobreaker and circuitbreaker count consecutive failures; none has a count-based
rate window, slow calls, a half-open quota and an injected clock, hence this module.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import time
from collections.abc import Callable
from types import TracebackType
from typing import Annotated, Any, Self

from msgspec import Meta, Struct

from modelyard.core.errors import ModelyardError, ServiceUnavailableError

__all__ = [
    "BreakerSettings",
    "CircuitBreaker",
    "CircuitState",
    "Permit",
    "counts_as_failure",
]

Clock = Callable[[], float]
TransitionCallback = Callable[["CircuitBreaker", "CircuitState", "CircuitState"], None]
log = logging.getLogger(__name__)

Percent = Annotated[float, Meta(gt=0, le=100)]
Millis = Annotated[float, Meta(ge=0)]


class BreakerSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[models.breaker]``: when a model version stops being called for a while."""

    enabled: bool = True
    #: How many of the most recent calls the rates are computed over.
    window_size: Annotated[int, Meta(ge=1, le=100_000)] = 20
    #: Calls needed in the window before a rate can trip; capped at ``window_size``.
    minimum_calls: Annotated[int, Meta(ge=1)] = 10
    #: Trip when this percentage of the window failed (5xx, backend error, timeout).
    failure_rate_threshold: Percent = 50.0
    #: A call that takes longer than this is slow (whether it succeeded or not).
    slow_call_duration_ms: Annotated[float, Meta(gt=0)] = 60_000.0
    #: Trip when this percentage of the window was slow.
    slow_call_rate_threshold: Percent = 100.0
    #: How long the breaker stays open before it lets probes through.
    wait_in_open_ms: Millis = 30_000.0
    #: Each consecutive opening (without closing in between) waits this many times longer.
    wait_in_open_multiplier: Annotated[float, Meta(ge=1)] = 1.0
    #: The longest an opening may last, however many times it reopened.
    max_wait_in_open_ms: Millis = 300_000.0
    #: Probes admitted while half-open; the rest are refused until they decide.
    permitted_calls_in_half_open: Annotated[int, Meta(ge=1, le=10_000)] = 3
    #: Reopen if the probes have not all reported after this long; None waits for ever.
    max_wait_in_half_open_ms: Annotated[float, Meta(gt=0)] | None = None

    def __post_init__(self) -> None:
        if self.max_wait_in_open_ms < self.wait_in_open_ms:
            # msgspec turns this into a ValidationError naming the field's path.
            raise ValueError("max_wait_in_open_ms must be at least wait_in_open_ms")


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def counts_as_failure(exc: BaseException | None) -> bool | None:
    """How the breaker (and failover) treat ``exc`` raised by a call.

    True: the version failed. False: refused before the backend was asked (a full queue,
    draining): not a call, and another version may well answer. None: not a call, and the
    same anywhere (a 4xx, a cancellation).
    """
    if exc is None:
        return True
    if not isinstance(exc, Exception):  # CancelledError, KeyboardInterrupt, GeneratorExit
        return None
    if isinstance(exc, ModelyardError):
        if exc.status_code < 500:
            return None
        return exc.counts_as_failure
    return True


class _Window:
    """The last ``size`` recorded outcomes with running failure and slow counts."""

    def __init__(self, size: int) -> None:
        self._outcomes: collections.deque[tuple[bool, bool]] = collections.deque(maxlen=size)
        self.failed = 0
        self.slow = 0

    def __len__(self) -> int:
        return len(self._outcomes)

    def add(self, failed: bool, slow: bool) -> None:
        if len(self._outcomes) == self._outcomes.maxlen:
            old_failed, old_slow = self._outcomes[0]
            self.failed -= old_failed
            self.slow -= old_slow
        self._outcomes.append((failed, slow))
        self.failed += failed
        self.slow += slow

    def rates(self) -> tuple[float, float]:
        """Failure and slow-call rates in percent (0 when empty)."""
        n = len(self._outcomes)
        if n == 0:
            return 0.0, 0.0
        return 100.0 * self.failed / n, 100.0 * self.slow / n


class Permit:
    """One admitted call; report it once with ``success``, ``failure`` or ``release``.

    Also a (sync or async) context manager: leaving the block records a success, an
    exception is classified by :func:`counts_as_failure`, and the duration is measured with
    the breaker's clock from the moment the permit was granted.
    """

    __slots__ = ("_breaker", "_epoch", "done", "started_at")

    def __init__(self, breaker: CircuitBreaker, epoch: int, started_at: float) -> None:
        self._breaker = breaker
        self._epoch = epoch
        self.started_at = started_at
        self.done = False

    def success(self, duration_s: float | None = None) -> None:
        self._finish(failed=False, duration_s=duration_s)

    def failure(self, exc: BaseException | None = None, duration_s: float | None = None) -> None:
        """Record ``exc``: a 4xx, a cancellation or an admission refusal only releases."""
        if not counts_as_failure(exc):
            self.release()
        else:
            self._finish(failed=True, duration_s=duration_s)

    def release(self) -> None:
        """Give the permit back without recording a call."""
        if not self.done:
            self.done = True
            self._breaker._release(self._epoch)

    def _finish(self, *, failed: bool, duration_s: float | None) -> None:
        if self.done:
            return
        self.done = True
        if duration_s is None:
            duration_s = self._breaker.clock() - self.started_at
        self._breaker._record(self._epoch, failed=failed, duration_s=duration_s)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.success()
        else:
            self.failure(exc)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class CircuitBreaker:
    """CLOSED -> OPEN -> HALF_OPEN -> CLOSED | OPEN, for one model version."""

    def __init__(
        self,
        name: str,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self.name = name
        self.settings = settings if settings is not None else BreakerSettings()
        self.clock = clock
        self._wall_clock = wall_clock
        self.on_transition = on_transition
        #: (old, new) -> how many times the breaker moved that way.
        self.transitions: collections.Counter[tuple[CircuitState, CircuitState]] = (
            collections.Counter()
        )
        self._state = CircuitState.CLOSED
        self._epoch = 0  # bumps on every transition: late outcomes of older calls are dropped
        self._window = _Window(self.settings.window_size)
        self._probes = _Window(self.settings.permitted_calls_in_half_open)
        self._probes_admitted = 0
        self._openings = 0  # consecutive, reset when the breaker closes
        self._entered_at = clock()
        self._open_for_s = 0.0
        self._opened_wall: float | None = None
        self.reason = ""

    # -- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        self._tick()
        return self._state

    @property
    def retry_after(self) -> float:
        """Seconds until a call may be admitted again (0 when one would be now)."""
        self._tick()
        if self._state is CircuitState.OPEN:
            return max(0.0, self._entered_at + self._open_for_s - self.clock())
        if self._state is CircuitState.HALF_OPEN and not self._half_open_has_room():
            return 1.0  # the probes are out; their verdict is usually close
        return 0.0

    def allow(self) -> bool:
        """Whether ``acquire`` would admit a call now; takes no permit."""
        self._tick()
        if not self.settings.enabled or self._state is CircuitState.CLOSED:
            return True
        return self._state is CircuitState.HALF_OPEN and self._half_open_has_room()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view for ``/admin/models`` and v2 model metadata."""
        state = self.state
        window = self._probes if state is CircuitState.HALF_OPEN else self._window
        failure_rate, slow_rate = window.rates()
        return {
            "enabled": self.settings.enabled,
            "state": state.value,
            "failure_rate": round(failure_rate, 2),
            "slow_call_rate": round(slow_rate, 2),
            "calls": len(window),
            "failed_calls": window.failed,
            "slow_calls": window.slow,
            "window_size": self.settings.window_size,
            "minimum_calls": self._minimum_calls(),
            "opened_at": self._opened_wall if state is not CircuitState.CLOSED else None,
            "retry_after": round(self.retry_after, 3),
            "consecutive_openings": self._openings,
            "half_open_permits_left": (
                self.settings.permitted_calls_in_half_open - self._probes_admitted
                if state is CircuitState.HALF_OPEN else None
            ),
            "transitions": sum(self.transitions.values()),
            "reason": self.reason or None,
        }

    # -- admitting -------------------------------------------------------------------------

    def acquire(self) -> Permit:
        """A permit for one call, or ServiceUnavailableError (503 + Retry-After) when refused."""
        self._tick()
        if self.settings.enabled and self._state is not CircuitState.CLOSED:
            if self._state is CircuitState.OPEN or not self._half_open_has_room():
                raise self._refusal()
            self._probes_admitted += 1
        return Permit(self, self._epoch, self.clock())

    def call(self) -> Permit:
        """``acquire`` spelled for ``async with breaker.call():``, which reports by itself."""
        return self.acquire()

    def reset(self) -> None:
        """Close the breaker and forget every recorded call (an operator's override)."""
        self._openings = 0
        self._transition(CircuitState.CLOSED, reason="reset")

    def force_open(self, reason: str) -> None:
        """Open now, whatever the window says (the version is known to be broken).

        The opening lasts as any other; the probes that follow decide as usual. A disabled
        breaker stays out of the way.
        """
        self._tick()
        if self.settings.enabled and self._state is not CircuitState.OPEN:
            self._transition(CircuitState.OPEN, reason=reason)

    def _refusal(self) -> ServiceUnavailableError:
        wait = self.retry_after
        if self._state is CircuitState.OPEN:
            detail = (
                f"{self.name} is failing and its circuit breaker is open ({self.reason}); "
                f"retry in {math.ceil(wait)}s"
            )
        else:
            detail = f"{self.name} is being probed after failures; retry shortly"
        return ServiceUnavailableError(
            detail,
            retry_after=math.ceil(wait),
            extra={"breaker": {"name": self.name, "state": self._state.value,
                               "retry_after": round(wait, 3)}},
        )

    # -- recording (called by Permit) ------------------------------------------------------

    def _release(self, epoch: int) -> None:
        if epoch == self._epoch and self._state is CircuitState.HALF_OPEN:
            self._probes_admitted -= 1

    def _record(self, epoch: int, *, failed: bool, duration_s: float) -> None:
        self._tick()
        if not self.settings.enabled or epoch != self._epoch:
            return  # a call admitted before the last transition says nothing about now
        slow = duration_s * 1000.0 > self.settings.slow_call_duration_ms
        if self._state is CircuitState.CLOSED:
            self._window.add(failed, slow)
            if len(self._window) >= self._minimum_calls():
                verdict = self._exceeded(self._window)
                if verdict:
                    self._transition(CircuitState.OPEN, reason=verdict)
        elif self._state is CircuitState.HALF_OPEN:
            self._probes.add(failed, slow)
            if len(self._probes) >= self.settings.permitted_calls_in_half_open:
                verdict = self._exceeded(self._probes)
                if verdict:
                    self._transition(CircuitState.OPEN, reason=f"probes: {verdict}")
                else:
                    self._transition(CircuitState.CLOSED, reason="")

    def _exceeded(self, window: _Window) -> str:
        """Why the window trips the breaker, or '' when it does not."""
        failure_rate, slow_rate = window.rates()
        s = self.settings
        if failure_rate >= s.failure_rate_threshold:
            return (
                f"{window.failed} of the last {len(window)} calls failed "
                f"({failure_rate:.0f}% >= {s.failure_rate_threshold:g}%)"
            )
        if slow_rate >= s.slow_call_rate_threshold:
            return (
                f"{window.slow} of the last {len(window)} calls took over "
                f"{s.slow_call_duration_ms:g} ms ({slow_rate:.0f}% >= "
                f"{s.slow_call_rate_threshold:g}%)"
            )
        return ""

    # -- state machine ---------------------------------------------------------------------

    def _minimum_calls(self) -> int:
        # As in resilience4j: a count window can never hold more than window_size calls.
        return min(self.settings.minimum_calls, self.settings.window_size)

    def _half_open_has_room(self) -> bool:
        return self._probes_admitted < self.settings.permitted_calls_in_half_open

    def _tick(self) -> None:
        """Apply the transitions that only time causes."""
        now = self.clock()
        if self._state is CircuitState.OPEN and now >= self._entered_at + self._open_for_s:
            self._transition(CircuitState.HALF_OPEN, reason=self.reason)
        limit = self.settings.max_wait_in_half_open_ms
        if (
            self._state is CircuitState.HALF_OPEN and limit is not None
            and (now - self._entered_at) * 1000.0 >= limit
        ):
            self._transition(CircuitState.OPEN, reason="probes did not report in time")

    def _open_duration_s(self) -> float:
        s = self.settings
        wait_ms = s.wait_in_open_ms * s.wait_in_open_multiplier ** (self._openings - 1)
        return min(wait_ms, s.max_wait_in_open_ms) / 1000.0

    def _transition(self, new: CircuitState, *, reason: str) -> None:
        old = self._state
        self._state = new
        self._epoch += 1
        self._entered_at = self.clock()
        self.reason = reason
        if new is CircuitState.OPEN:
            self._openings += 1
            self._open_for_s = self._open_duration_s()
            self._opened_wall = self._wall_clock()
        elif new is CircuitState.HALF_OPEN:
            self._probes = _Window(self.settings.permitted_calls_in_half_open)
            self._probes_admitted = 0
        else:
            self._openings = 0
            self._opened_wall = None
            self._window = _Window(self.settings.window_size)
        if old is new:
            return
        self.transitions[(old, new)] += 1
        level = logging.WARNING if new is CircuitState.OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s -> %s%s", self.name, old.value, new.value,
                f" ({reason})" if reason else "")
        if self.on_transition is not None:
            try:
                self.on_transition(self, old, new)
            except Exception:  # metrics must never break a call
                log.exception("on_transition callback of %s raised", self.name)
