"""Circuit breaker: count window, thresholds, open/half-open timing, probes, backoff."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelyard.core.breaker import BreakerSettings, CircuitBreaker, CircuitState, counts_as_failure
from modelyard.core.errors import (
    BackendError,
    BadRequestError,
    DrainingError,
    ModelNotFoundError,
    QueueFullError,
    RateLimitedError,
    ServiceUnavailableError,
    TimeoutError_,
    UnprocessableError,
)
from modelyard.testing import FakeClock

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN


def make(clock: FakeClock, **overrides: Any) -> CircuitBreaker:
    settings = {
        "window_size": 10, "minimum_calls": 10, "failure_rate_threshold": 50.0,
        "wait_in_open_ms": 30_000.0, "permitted_calls_in_half_open": 3, **overrides,
    }
    return CircuitBreaker(
        "m:1", msgspec.convert(settings, BreakerSettings), clock=clock, wall_clock=lambda: 1.7e9
    )


def record(breaker: CircuitBreaker, outcomes: str) -> None:
    """'s' success, 'f' failure (a 500)."""
    for outcome in outcomes:
        permit = breaker.acquire()
        if outcome == "s":
            permit.success(0.01)
        else:
            permit.failure(BackendError("boom"), 0.01)


def trip(breaker: CircuitBreaker) -> None:
    record(breaker, "f" * breaker.settings.window_size)
    assert breaker.state is OPEN


class Backend:
    """Counts how often it is really called."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.fail = fail

    async def __call__(self) -> str:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return "ok"


# -- closed: the window and its thresholds -------------------------------------------------


def test_nine_calls_with_five_failures_stay_closed_and_the_tenth_failure_trips(
    fake_clock: FakeClock,
) -> None:
    breaker = make(fake_clock)
    record(breaker, "fffffssss")
    assert breaker.state is CLOSED, "fewer than minimum_calls never trip"
    assert breaker.snapshot()["failure_rate"] == pytest.approx(55.56)
    record(breaker, "f")
    assert breaker.state is OPEN
    assert breaker.transitions[(CLOSED, OPEN)] == 1
    assert "6 of the last 10 calls failed" in breaker.reason


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [("ffff" + "ssssss", CLOSED), ("fffff" + "sssss", OPEN)],
    ids=["40%-stays-closed", "exactly-50%-trips"],
)
def test_failure_rate_trips_at_the_threshold_inclusive(
    fake_clock: FakeClock, outcomes: str, expected: CircuitState
) -> None:
    breaker = make(fake_clock)
    record(breaker, outcomes)
    assert breaker.state is expected


def test_old_outcomes_slide_out_of_the_count_window(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, window_size=4, minimum_calls=4)
    record(breaker, "fsss")  # 25%
    record(breaker, "s")  # the failure slides out
    assert breaker.snapshot()["failed_calls"] == 0
    record(breaker, "f")  # s s s f -> 25%
    assert breaker.state is CLOSED
    record(breaker, "f")  # s s f f -> 50%
    assert breaker.state is OPEN


def test_minimum_calls_above_window_size_is_capped_at_the_window(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, window_size=4, minimum_calls=100)
    record(breaker, "ffff")
    assert breaker.state is OPEN


def test_client_errors_are_neither_failures_nor_calls(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock)
    for exc in (BadRequestError("bad"), ModelNotFoundError("nope")):
        for _ in range(20):
            breaker.acquire().failure(exc)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["calls"] == 0


ADMISSION_REFUSALS = [
    QueueFullError("queue full (32 waiting); retry shortly"),
    DrainingError("the server is shutting down"),
    RateLimitedError("slow down"),
    UnprocessableError("prompt too long"),
]


@pytest.mark.parametrize("refusal", ADMISSION_REFUSALS, ids=lambda e: type(e).__name__)
def test_admission_refusals_are_neither_failures_nor_calls(
    fake_clock: FakeClock, refusal: Exception
) -> None:
    breaker = make(fake_clock)
    for _ in range(50):
        with pytest.raises(type(refusal)), breaker.call():
            raise refusal
    assert breaker.state is CLOSED
    assert breaker.snapshot()["calls"] == 0


def test_failover_may_try_elsewhere_after_a_503_refusal_but_not_after_a_4xx() -> None:
    assert counts_as_failure(QueueFullError("full")) is False  # another target may have room
    assert counts_as_failure(DrainingError("bye")) is False
    assert counts_as_failure(RateLimitedError("slow down")) is None  # the same anywhere
    assert counts_as_failure(ServiceUnavailableError("the model's context is full")) is True


def test_an_admission_refusal_gives_its_probe_slot_to_another_caller(
    fake_clock: FakeClock,
) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=1)
    trip(breaker)
    fake_clock.advance(30)
    breaker.acquire().failure(QueueFullError("full"))
    assert breaker.state is HALF_OPEN
    breaker.acquire().success()
    assert breaker.state is CLOSED


def test_force_open_opens_at_once_and_half_opens_as_usual(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock)
    breaker.force_open("a backend call is stuck")
    assert breaker.state is OPEN
    with pytest.raises(ServiceUnavailableError, match="a backend call is stuck"):
        breaker.acquire()
    fake_clock.advance(30)
    assert breaker.state is HALF_OPEN
    disabled = make(fake_clock, enabled=False)
    disabled.force_open("stuck")
    assert disabled.allow()


async def test_context_manager_classifies_exceptions(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, window_size=3, minimum_calls=3, failure_rate_threshold=100.0)
    for exc in (BadRequestError("4xx"), TimeoutError_("slow backend"), RuntimeError("crash")):
        with pytest.raises(type(exc)):
            async with breaker.call():
                raise exc
    snap = breaker.snapshot()
    assert (snap["calls"], snap["failed_calls"]) == (2, 2), "the 400 is not a call"
    async with breaker.call():
        pass
    assert breaker.snapshot()["calls"] == 3


async def test_a_cancelled_call_is_not_recorded(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock)
    started = asyncio.Event()

    async def hang() -> None:
        async with breaker.call():
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hang())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.snapshot()["calls"] == 0


# -- slow calls ------------------------------------------------------------------------------


async def test_slow_calls_measured_with_the_injected_clock_trip_the_breaker(
    fake_clock: FakeClock,
) -> None:
    breaker = make(
        fake_clock, window_size=4, minimum_calls=4, slow_call_duration_ms=1000.0,
        slow_call_rate_threshold=50.0,
    )
    for seconds in (1.0, 0.2, 1.5):  # exactly the limit is not slow; over it is
        async with breaker.call():
            fake_clock.advance(seconds)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["slow_calls"] == 1
    async with breaker.call():
        fake_clock.advance(2.0)
    assert breaker.state is OPEN
    assert "took over 1000 ms" in breaker.reason
    assert breaker.snapshot()["failed_calls"] == 0, "slow successes are not failures"


# -- open: fail fast -------------------------------------------------------------------------


async def test_open_refuses_without_calling_the_backend_with_retry_after(
    fake_clock: FakeClock,
) -> None:
    breaker = make(fake_clock)
    backend = Backend(fail=BackendError("down"))
    for _ in range(10):
        with pytest.raises(BackendError):
            async with breaker.call():
                await backend()
    assert backend.calls == 10 and breaker.state is OPEN

    fake_clock.advance(10.4)
    with pytest.raises(ServiceUnavailableError) as refused:
        async with breaker.call():
            await backend()
    assert backend.calls == 10, "an open breaker never touches the backend"
    assert refused.value.status_code == 503
    assert refused.value.headers["Retry-After"] == "20"  # 19.6 s left, rounded up
    assert refused.value.extra["breaker"]["state"] == "open"
    assert not breaker.allow()
    assert breaker.retry_after == pytest.approx(19.6)


def test_wait_in_open_elapses_into_half_open(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock)
    trip(breaker)
    fake_clock.advance(29.999)
    assert breaker.state is OPEN
    fake_clock.advance(0.001)
    assert breaker.state is HALF_OPEN
    assert breaker.allow() and breaker.retry_after == 0
    assert breaker.transitions[(OPEN, HALF_OPEN)] == 1


# -- half-open: probes -----------------------------------------------------------------------


async def test_half_open_admits_exactly_the_permitted_probes_among_50_concurrent_callers(
    fake_clock: FakeClock,
) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=3)
    trip(breaker)
    fake_clock.advance(30)
    backend = Backend()
    gate = asyncio.Event()
    admitted = 0

    async def caller() -> str:
        nonlocal admitted
        async with breaker.call():
            admitted += 1
            await gate.wait()  # every probe is in flight while the others arrive
            return await backend()

    tasks = [asyncio.create_task(caller()) for _ in range(50)]
    for _ in range(100):  # bounded: every caller gets admitted or refused within a few turns
        if admitted + sum(t.done() for t in tasks) == 50:
            break
        await asyncio.sleep(0)
    assert admitted == 3 and sum(not t.done() for t in tasks) == 3
    assert breaker.snapshot()["half_open_permits_left"] == 0
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert sum(r == "ok" for r in results) == 3 and backend.calls == 3
    refused = [r for r in results if isinstance(r, ServiceUnavailableError)]
    assert len(refused) == 47
    assert breaker.state is CLOSED
    assert breaker.transitions[(HALF_OPEN, CLOSED)] == 1


def test_half_open_decides_only_when_every_probe_reported(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=4)
    trip(breaker)
    fake_clock.advance(30)
    probes = [breaker.acquire() for _ in range(4)]
    with pytest.raises(ServiceUnavailableError):
        breaker.acquire()
    probes[0].failure(BackendError("x"))
    for probe in probes[1:3]:
        probe.success()
    assert breaker.state is HALF_OPEN
    probes[3].success()  # 1 of 4 failed: 25% < 50%
    assert breaker.state is CLOSED
    assert breaker.snapshot()["calls"] == 0, "closing starts a fresh window"


def test_failing_probes_reopen_the_breaker(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=2)
    trip(breaker)
    fake_clock.advance(30)
    record(breaker, "sf")  # 50% >= 50%
    assert breaker.state is OPEN
    assert breaker.transitions[(HALF_OPEN, OPEN)] == 1
    assert breaker.reason.startswith("probes:")


def test_slow_probes_reopen_the_breaker(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=2, slow_call_duration_ms=500.0,
                   slow_call_rate_threshold=50.0)
    trip(breaker)
    fake_clock.advance(30)
    breaker.acquire().success(0.1)
    breaker.acquire().success(0.9)
    assert breaker.state is OPEN


def test_a_client_error_gives_its_probe_slot_to_another_caller(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=1)
    trip(breaker)
    fake_clock.advance(30)
    breaker.acquire().failure(BadRequestError("bad input"))
    assert breaker.state is HALF_OPEN
    breaker.acquire().success()
    assert breaker.state is CLOSED


def test_outcomes_of_calls_admitted_before_a_transition_are_ignored(
    fake_clock: FakeClock,
) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=1)
    late = breaker.acquire()
    trip(breaker)
    fake_clock.advance(30)
    late.failure(BackendError("finished late"))
    assert breaker.state is HALF_OPEN, "a closed-era call is not a probe"
    breaker.acquire().success()
    assert breaker.state is CLOSED


def test_probes_that_never_report_reopen_after_max_wait_in_half_open(
    fake_clock: FakeClock,
) -> None:
    breaker = make(fake_clock, permitted_calls_in_half_open=1, max_wait_in_half_open_ms=5000.0)
    trip(breaker)
    fake_clock.advance(30)
    breaker.acquire()  # leaked
    fake_clock.advance(5)
    assert breaker.state is OPEN
    assert breaker.reason == "probes did not report in time"


# -- backoff ---------------------------------------------------------------------------------


def test_wait_in_open_grows_on_repeated_openings_up_to_the_cap(fake_clock: FakeClock) -> None:
    breaker = make(
        fake_clock, wait_in_open_ms=1000.0, wait_in_open_multiplier=2.0,
        max_wait_in_open_ms=5000.0, permitted_calls_in_half_open=1,
    )
    trip(breaker)
    waits = []
    for _ in range(5):
        waits.append(breaker.retry_after)
        fake_clock.advance(breaker.retry_after)
        assert breaker.state is HALF_OPEN
        record(breaker, "f")
    assert waits == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert breaker.snapshot()["consecutive_openings"] == 6

    fake_clock.advance(breaker.retry_after)
    record(breaker, "s")
    assert breaker.state is CLOSED
    trip(breaker)
    assert breaker.retry_after == 1.0, "closing resets the backoff"


# -- reporting and settings ----------------------------------------------------------------


def test_snapshot_and_transition_callback(fake_clock: FakeClock) -> None:
    seen: list[tuple[str, str]] = []
    breaker = make(fake_clock)
    breaker.on_transition = lambda b, old, new: seen.append((old.value, new.value))
    assert breaker.snapshot() == {
        "enabled": True, "state": "closed", "failure_rate": 0.0, "slow_call_rate": 0.0,
        "calls": 0, "failed_calls": 0, "slow_calls": 0, "window_size": 10,
        "minimum_calls": 10, "opened_at": None, "retry_after": 0.0,
        "consecutive_openings": 0, "half_open_permits_left": None, "transitions": 0,
        "reason": None,
    }
    trip(breaker)
    fake_clock.advance(12)
    snap = breaker.snapshot()
    assert snap["state"] == "open" and snap["failure_rate"] == 100.0 and snap["calls"] == 10
    assert snap["opened_at"] == 1.7e9 and snap["retry_after"] == 18.0
    fake_clock.advance(18)
    assert breaker.snapshot()["half_open_permits_left"] == 3
    breaker.reset()
    assert seen == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert sum(breaker.transitions.values()) == 3


def test_a_failing_transition_callback_does_not_break_calls(fake_clock: FakeClock) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("metrics down")

    breaker = make(fake_clock)
    breaker.on_transition = explode
    trip(breaker)
    assert breaker.state is OPEN


def test_a_disabled_breaker_never_refuses(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock, enabled=False)
    record(breaker, "f" * 50)
    assert breaker.state is CLOSED and breaker.allow()


def test_permit_reports_once(fake_clock: FakeClock) -> None:
    breaker = make(fake_clock)
    permit = breaker.acquire()
    permit.failure(BackendError("x"))
    permit.success()
    permit.release()
    assert breaker.snapshot()["calls"] == 1


def test_settings_decode_with_paths_in_errors() -> None:
    assert msgspec.convert({}, BreakerSettings) == BreakerSettings()
    with pytest.raises(msgspec.ValidationError, match="unknown field `window`"):
        msgspec.convert({"window": 3}, BreakerSettings)
    with pytest.raises(msgspec.ValidationError, match="failure_rate_threshold"):
        msgspec.convert({"failure_rate_threshold": 150}, BreakerSettings)
    with pytest.raises(msgspec.ValidationError, match="max_wait_in_open_ms must be at least"):
        msgspec.convert({"wait_in_open_ms": 10_000, "max_wait_in_open_ms": 1000}, BreakerSettings)


def test_the_documented_breaker_table_is_the_defaults() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "reliability.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    table = tomllib.loads(next(b for b in blocks if "[models.breaker]" in b))
    assert msgspec.convert(table["models"][0]["breaker"], BreakerSettings) == BreakerSettings()
