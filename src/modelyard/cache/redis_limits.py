"""Token buckets in a shared Redis/Valkey (``[cluster] store``): a key's limit holds across
every server using the store, however many ingress replicas there are.

Each request runs one Lua script (``EVALSHA``; redis-py loads it once, and again after the
server restarts) that refills, spends and stores the bucket atomically, and sets the key to
expire once the bucket would be full again, so idle buckets cost nothing. The arithmetic is
the local ``TokenBucket``'s, to the same float, so ``Decision`` (remaining, ``Retry-After``,
reset) reads the same.

Time: the script reads the store's own clock (``TIME``) unless a ``now`` clock is injected
(tests). One clock for every server means no skew between ingress machines: two servers
whose clocks differ by seconds would otherwise each refill by their own idea of elapsed time.
The bucket's time also never moves back, so a store failover to a server whose clock lags
adds no tokens.

The store unreachable: the decision comes from a local ``RateLimiter`` (limits then hold per
server, not per cluster), each such decision is counted (``on_store_error``, the metric
``modelyard_shared_store_errors_total{operation="rate_limit"}``) and the outage is logged once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from modelyard.cache.redis_store import SharedStore, StoreUnavailable
from modelyard.core.ratelimit import EPSILON, Decision, RateLimit, RateLimiter, decide

__all__ = ["SharedRateLimiter"]

#: Longest a bucket key is kept (a tiny rate would otherwise ask for centuries).
_MAX_TTL_MS = 10 * 365 * 86400 * 1000

# KEYS[1]: the bucket. ARGV: rate, burst, cost, now (< 0: the store's TIME), epsilon, max ttl.
_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local now = tonumber(ARGV[4])
local epsilon = tonumber(ARGV[5])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local shape = ARGV[1] .. '/' .. ARGV[2]
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated', 'shape')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil or state[3] ~= shape then
  tokens = burst  -- new, expired, or a changed limit: a fresh, full bucket
  updated = now
end
if now > updated then  -- a clock that steps back adds nothing and moves nothing back
  tokens = math.min(burst, tokens + (now - updated) * rate)
  updated = now
end
local allowed = 0
if tokens + epsilon >= cost then
  allowed = 1
  tokens = math.max(0, tokens - cost)
end
local left = string.format('%.17g', tokens)
redis.call('HSET', KEYS[1], 'tokens', left, 'updated', string.format('%.17g', updated),
           'shape', shape)
local ttl = math.min(math.ceil((burst - tokens) / rate * 1000) + 1000, tonumber(ARGV[6]))
redis.call('PEXPIRE', KEYS[1], ttl)
return {allowed, left}
"""


class SharedRateLimiter:
    """A :class:`~modelyard.core.ratelimit.Limiter` whose buckets live in a shared store."""

    def __init__(
        self,
        url: str,
        *,
        fallback: RateLimiter | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], float] | None = None,
        prefix: str = "modelyard:ratelimit:",
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        on_store_error: Callable[[str], None] | None = None,
    ) -> None:
        """``clock`` (monotonic) times the back-off and the fallback's buckets; ``now`` (a wall
        clock every server shares, seconds) replaces the store's ``TIME`` when given."""
        self._store = SharedStore(
            url, timeout_s=timeout_s, retry_s=retry_s, clock=clock, on_error=on_store_error,
            what="shared rate-limit store",
        )
        self._fallback = fallback if fallback is not None else RateLimiter(clock=clock)
        self._now = now
        self._prefix = prefix
        self._take = self._store.client.register_script(_TAKE)

    @property
    def available(self) -> bool:
        """False while decisions come from the local fallback."""
        return self._store.available

    async def charge(self, key: str, limit: RateLimit, cost: float = 1.0) -> Decision:
        now = -1.0 if self._now is None else self._now()
        args = [repr(float(limit.rate)), str(limit.burst), repr(float(cost)), repr(now),
                repr(EPSILON), str(_MAX_TTL_MS)]
        bucket = self._prefix + key
        try:
            allowed, left = await self._store.run(
                "rate_limit", lambda client: self._take(keys=[bucket], args=args)
            )
        except StoreUnavailable:
            return self._fallback.take(key, limit, cost)
        return decide(limit, float(left), allowed=bool(allowed), cost=cost)

    async def aclose(self) -> None:
        await self._store.aclose()
