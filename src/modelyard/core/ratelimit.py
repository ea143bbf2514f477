"""Token buckets per caller with an injected clock: 429 means your quota, never our capacity.

``RateLimiter`` keeps the buckets in this process. A :class:`Limiter` keeps them anywhere; a
server configured with ``[cluster] store`` uses one shared by every server
(``modelyard.cache.redis_limits``), whose decisions follow :func:`decide` exactly.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Annotated, Protocol

from msgspec import Meta, Struct

from modelyard.core.auth import Principal

__all__ = [
    "EPSILON",
    "Decision",
    "LimitedPrincipal",
    "Limiter",
    "RateLimit",
    "RateLimiter",
    "TokenBucket",
    "decide",
]

#: Float refill arithmetic may land a hair under a whole token; a request is not refused for it.
EPSILON = 1e-9


class RateLimit(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A token bucket's shape: ``burst`` requests at once, refilled at ``rate`` per second."""

    rate: Annotated[float, Meta(gt=0)]
    burst: Annotated[int, Meta(ge=1)]

    @property
    def window_s(self) -> int:
        """Seconds an empty bucket takes to fill: the ``w`` of the RateLimit-Policy field."""
        return max(1, math.ceil(self.burst / self.rate))


class LimitedPrincipal(Principal, frozen=True, kw_only=True):
    """A principal that carries its own rate limit (an API key created with one)."""

    rate_limit: RateLimit | None = None


class Decision(Struct, frozen=True, kw_only=True):
    """The answer for one request: allowed or not, and what the RateLimit fields report."""

    allowed: bool
    limit: RateLimit
    #: Whole tokens left after this request.
    remaining: int
    #: Seconds until the next token when refused; 0 when allowed.
    retry_after_s: float
    #: Seconds until the bucket is full again.
    reset_s: float


def decide(limit: RateLimit, tokens: float, *, allowed: bool, cost: float = 1.0) -> Decision:
    """The decision for a bucket holding ``tokens`` after one request was ``allowed`` or not."""
    missing = 0.0 if allowed else cost - tokens
    return Decision(
        allowed=allowed,
        limit=limit,
        remaining=math.floor(tokens + EPSILON),
        retry_after_s=missing / limit.rate,
        reset_s=(limit.burst - tokens) / limit.rate,
    )


class Limiter(Protocol):
    """Where the buckets live: this process (``RateLimiter``) or a store servers share."""

    async def charge(self, key: str, limit: RateLimit, cost: float = 1.0) -> Decision:
        """Spend ``cost`` tokens of ``key``'s bucket if it has them; the decision either way."""

    async def aclose(self) -> None:
        """Release connections, if any."""


class TokenBucket:
    """One caller's bucket; ``take`` refills by elapsed time, then spends ``cost`` if it can."""

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self.tokens = float(limit.burst)
        self.updated = now

    def take(self, now: float, cost: float = 1.0) -> Decision:
        elapsed = max(0.0, now - self.updated)  # a clock that steps back never adds tokens
        self.tokens = min(float(self.limit.burst), self.tokens + elapsed * self.limit.rate)
        self.updated = now
        allowed = self.tokens + EPSILON >= cost
        if allowed:
            self.tokens = max(0.0, self.tokens - cost)
        return decide(self.limit, self.tokens, allowed=allowed, cost=cost)


class RateLimiter:
    """Buckets by caller key (a principal id, or a client address for anonymous callers).

    The least recently used buckets are dropped past ``max_buckets`` so a flood of distinct
    addresses cannot grow memory without bound; a dropped caller simply starts full again.
    """

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, max_buckets: int = 100_000
    ) -> None:
        self._clock = clock
        self._max = max_buckets
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, limit: RateLimit, cost: float = 1.0) -> Decision:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:
            # A changed limit (config reload, a key re-issued) starts a fresh, full bucket.
            bucket = self._buckets[key] = TokenBucket(limit, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return bucket.take(now, cost)

    async def charge(self, key: str, limit: RateLimit, cost: float = 1.0) -> Decision:
        """``take`` as a :class:`Limiter`."""
        return self.take(key, limit, cost)

    async def aclose(self) -> None:
        pass

    def peek(self, key: str) -> TokenBucket | None:
        """The bucket of ``key`` if it has one (for tests and diagnostics)."""
        return self._buckets.get(key)

    def __len__(self) -> int:
        return len(self._buckets)
