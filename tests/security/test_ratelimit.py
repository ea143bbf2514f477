"""Token buckets: exact refill under an injected clock, burst, eviction."""

from __future__ import annotations

import pytest

from modelyard.core.ratelimit import RateLimit, RateLimiter, TokenBucket
from modelyard.testing import FakeClock


def test_a_full_bucket_allows_its_burst_then_refuses() -> None:
    bucket = TokenBucket(RateLimit(rate=2, burst=3), now=0.0)
    decisions = [bucket.take(0.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert [d.remaining for d in decisions] == [2, 1, 0, 0]
    assert decisions[-1].retry_after_s == pytest.approx(0.5)  # one token at 2/s
    assert decisions[-1].reset_s == pytest.approx(1.5)  # three tokens at 2/s


def test_refill_is_exact_to_the_token() -> None:
    limit = RateLimit(rate=0.1, burst=1)  # one request every ten seconds
    bucket = TokenBucket(limit, now=0.0)
    assert bucket.take(0.0).allowed
    for t in (1.0, 5.0, 9.999):
        assert not bucket.take(t).allowed
    # 0.1 * 10 is 1.0000000000000002 or 0.9999999999999999 depending on the path taken:
    # exactly one token has come back at t=10, never a refusal for a rounding hair.
    assert bucket.take(10.0).allowed
    assert not bucket.take(10.0).allowed


def test_refill_never_exceeds_the_burst_and_a_clock_step_back_adds_nothing() -> None:
    bucket = TokenBucket(RateLimit(rate=100, burst=2), now=0.0)
    assert bucket.take(1000.0).remaining == 1  # an hour idle still means a burst of 2
    bucket.take(1000.0)
    assert not bucket.take(999.0).allowed


def test_the_limiter_keeps_a_bucket_per_key(fake_clock: FakeClock) -> None:
    limiter = RateLimiter(clock=fake_clock)
    limit = RateLimit(rate=1, burst=1)
    assert limiter.take("a", limit).allowed
    assert not limiter.take("a", limit).allowed
    assert limiter.take("b", limit).allowed  # another caller has its own
    fake_clock.advance(1.0)
    assert limiter.take("a", limit).allowed


def test_a_changed_limit_starts_a_fresh_bucket(fake_clock: FakeClock) -> None:
    limiter = RateLimiter(clock=fake_clock)
    assert limiter.take("k", RateLimit(rate=1, burst=1)).allowed
    assert limiter.take("k", RateLimit(rate=1, burst=5)).remaining == 4


def test_least_recently_used_buckets_are_dropped(fake_clock: FakeClock) -> None:
    limiter = RateLimiter(clock=fake_clock, max_buckets=2)
    limit = RateLimit(rate=1, burst=1)
    for key in ("a", "b", "a", "c"):
        limiter.take(key, limit)
    assert len(limiter) == 2
    assert limiter.peek("b") is None and limiter.peek("a") is not None


def test_the_policy_window_is_the_time_to_fill() -> None:
    assert RateLimit(rate=5, burst=20).window_s == 4
    assert RateLimit(rate=10, burst=1).window_s == 1
    assert RateLimit(rate=0.5, burst=3).window_s == 6
