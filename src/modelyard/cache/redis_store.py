"""A connection to a shared Redis/Valkey store that fails fast, backs off, and says so once.

Everything that uses the shared store (the ``redis`` cache tier, its purge index, cluster-wide
rate limits) goes through :class:`SharedStore.run`: a failure raises :class:`StoreUnavailable`
for the caller to degrade on (a miss, a skipped write, the local limiter), is counted per
operation, and is logged once per outage rather than once per request. After a connection
failure the store is left alone for ``retry_s``; the next call after that tries again, so the
store recovers on its own when the server returns.

``redis.asyncio`` is imported when a store is built, so it is needed only where one is
configured (``pip install 'modelyard[redis]'``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from modelyard.core.errors import ConfigError

__all__ = ["SharedStore", "StoreUnavailable", "client_url", "redacted"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The URL schemes accepted, and what redis-py is given (Valkey speaks the same protocol).
_SCHEMES = {
    "redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss",
    "unix": "unix",
}
#: Errors other than lost connections (a full ``noeviction`` store, ...) are logged this often.
_WARN_EVERY_S = 60.0


class StoreUnavailable(Exception):
    """The shared store could not serve this operation; the caller degrades."""


def client_url(url: str) -> str:
    """``url`` as redis-py takes it: ``valkey://`` → ``redis://``, ``valkeys://`` → ``rediss://``.

    ValueError for any other scheme.
    """
    scheme, sep, rest = url.partition("://")
    mapped = _SCHEMES.get(scheme.lower()) if sep else None
    if mapped is None:
        raise ValueError(
            f"{redacted(url)!r} is not a store URL: expected redis://, rediss://, valkey://, "
            "valkeys:// or unix://"
        )
    return f"{mapped}://{rest}"


def redacted(url: str) -> str:
    """``url`` without its password, for logs and stats."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class SharedStore:
    """One ``redis.asyncio`` client (a connection pool) and its outage bookkeeping.

    ``clock`` is monotonic (tests: a ``FakeClock``) and times only the back-off;
    ``on_error(operation)`` is told of every degraded operation (a metric).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 0.25,
        retry_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str], None] | None = None,
        what: str = "shared store",
    ) -> None:
        try:
            import redis.asyncio
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as LostConnection
            from redis.exceptions import RedisError
            from redis.exceptions import TimeoutError as StoreTimeout
        except ImportError:
            raise ConfigError(
                f"the {what} needs the Redis client: pip install 'modelyard[redis]'"
            ) from None
        self.url = redacted(url)
        self.what = what
        self._retry_s = retry_s
        self._clock = clock
        self._on_error = on_error
        self._redis_errors: tuple[type[BaseException], ...] = (RedisError, OSError)
        self._lost: tuple[type[BaseException], ...] = (LostConnection, StoreTimeout, OSError)
        # No retries inside redis-py: one failed call is one miss, not a second of back-off.
        self.client: Any = redis.asyncio.Redis.from_url(
            client_url(url),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self.errors: dict[str, int] = {}
        self._down_until: float | None = None
        self._warned_at: float | None = None

    @property
    def available(self) -> bool:
        """False from a lost connection until a call succeeds again."""
        return self._down_until is None

    async def run(self, operation: str, call: Callable[[Any], Awaitable[T]]) -> T:
        """``call(client)``, or ``StoreUnavailable`` (counted under ``operation``)."""
        if self._down_until is not None and self._clock() < self._down_until:
            self._count(operation)  # backing off: not even a connect attempt
            raise StoreUnavailable(f"{self.what} at {self.url} is unreachable")
        try:
            result = await call(self.client)
        except self._redis_errors as exc:
            self._count(operation)
            self._failed(operation, exc)
            raise StoreUnavailable(f"{self.what} at {self.url}: {exc}") from None
        if self._down_until is not None:
            self._down_until = None
            log.warning("%s at %s answers again", self.what, self.url)
        return result

    def _count(self, operation: str) -> None:
        self.errors[operation] = self.errors.get(operation, 0) + 1
        if self._on_error is not None:
            self._on_error(operation)

    def _failed(self, operation: str, exc: BaseException) -> None:
        now = self._clock()
        if isinstance(exc, self._lost):
            if self._down_until is None:
                log.warning(
                    "%s at %s is unreachable (%s: %s); degrading until it answers",
                    self.what, self.url, operation, exc,
                )
            self._down_until = now + self._retry_s
            return
        if self._warned_at is None or now - self._warned_at >= _WARN_EVERY_S:
            self._warned_at = now
            log.warning("%s at %s failed on %s: %s", self.what, self.url, operation, exc)

    async def aclose(self) -> None:
        await self.client.aclose()
