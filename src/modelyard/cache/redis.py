"""The ``redis`` tier: answers and purges shared by every server using one Redis or Valkey.

Values are the layer's bytes (already MAC'd) in a zstd frame, stored with ``SET ... PX`` under
``prefix + key``; nothing is ever pickled. The server bounds the tier: give it ``maxmemory``
and ``maxmemory-policy allkeys-lru`` (docs/cache.md). The purge index lives in the same store
(``prefix + "generations"``), so a purge on one server is seen by every other's next lookup.

The store being unreachable is never a failed request: a read is a miss, a write is skipped,
a lookup that cannot confirm the purge index is a miss; each is counted in ``stats()``
(``store_errors``, exported as ``modelyard_shared_store_errors_total``) and the outage is
logged once. The tier recovers by itself when the server returns.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
import zstandard
from msgspec import Meta

from modelyard.cache.generations import Generations
from modelyard.cache.redis_store import SharedStore, StoreUnavailable, client_url
from modelyard.core.cache_tier import CacheTier
from modelyard.core.errors import ServiceUnavailableError

__all__ = ["RedisGenerations", "RedisOptions", "RedisTier"]

log = logging.getLogger(__name__)

#: A stored frame must say how large it unpacks, and no larger than this (a zstd bomb written
#: by whoever else can write the store is refused before it is unpacked).
MAX_VALUE_BYTES = 256 * 1024 * 1024
#: Values this large are (de)compressed in a worker thread rather than on the event loop.
_THREAD_BYTES = 256 * 1024
_INDEX = "generations"
_UNLOADED = b"?"  # the stamp of keys built before the index was first read: never current
_SCAN_BATCH = 1000

# KEYS[1]: the index. ARGV[1]: a fresh token, used only where the index has none (a new or
# lost index starts a new world, so entries keyed under a lost one are never revived).
_LOAD = """
if redis.call('HSETNX', KEYS[1], 'all', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'epoch', ARGV[1])
else
  redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""
# KEYS[1]: the index. ARGV: the field to renew, its new token, the new epoch.
_BUMP = """
redis.call('HSETNX', KEYS[1], 'all', ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2], 'epoch', ARGV[3])
return 1
"""


class RedisOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: ``redis://``, ``rediss://`` (TLS), ``valkey://``, ``valkeys://`` or ``unix://``; a
    #: password goes in the URL (``redis://:secret@host:6379/0``).
    url: str
    #: Every key of this tier starts with it; ``clear()`` touches nothing else.
    prefix: str = "modelyard:cache:"
    #: Seconds an entry lives (``SET ... PX``); 0 keeps it until the server evicts it.
    ttl_s: Annotated[float, Meta(ge=0)] = 3600.0
    #: Connect and socket timeout of each call: a slow store is a miss, not a slow answer.
    timeout_s: Annotated[float, Meta(gt=0, le=30)] = 0.25
    #: After a lost connection, seconds the store is left alone before it is tried again.
    retry_s: Annotated[float, Meta(ge=0)] = 1.0
    compression_level: Annotated[int, Meta(ge=1, le=22)] = 3

    def __post_init__(self) -> None:
        try:
            client_url(self.url)
        except ValueError as exc:
            raise ValueError(f"invalid url: {exc}") from None


class RedisGenerations:
    """The purge index in a hash of the shared store: ``all``, ``m:<model>`` and ``epoch``.

    Tokens come from a local snapshot; every key is stamped with the snapshot's epoch, which
    every purge changes. ``is_current`` is one ``HGET`` per lookup (which also keeps the hash
    recently used, so an LRU store does not evict it).
    """

    def __init__(self, store: SharedStore, key: bytes) -> None:
        self._store = store
        self._key = key
        self._load_script = store.client.register_script(_LOAD)
        self._bump_script = store.client.register_script(_BUMP)
        self._tokens: dict[str, str] = {}
        self._epoch = _UNLOADED

    def token(self, model: str) -> str:
        return f"{self._tokens.get('all', '')}/{self._tokens.get('m:' + model, '')}"

    @property
    def stamp(self) -> bytes:
        return self._epoch

    async def is_current(self, stamp: bytes) -> bool:
        try:
            epoch = await self._store.run(
                "generations", lambda client: client.hget(self._key, "epoch")
            )
            if epoch is not None and bytes(epoch) == stamp:
                return True
            if epoch is None or bytes(epoch) != self._epoch:
                await self._load()  # the next keys are built from the index as it is now
        except StoreUnavailable:
            pass
        return False

    async def _load(self) -> None:
        fields = await self._store.run(
            "generations",
            lambda client: self._load_script(keys=[self._key], args=[secrets.token_hex(8)]),
        )
        self._adopt(fields)

    def preload(self, url: str, timeout_s: float) -> None:
        """Read the index once, blocking, when the cache opens (in its worker thread): the
        first keys this server builds are then current, so its first answers are shared and
        its first lookups can hit. An unreachable store leaves it to the first lookup."""
        import redis

        client = redis.Redis.from_url(
            client_url(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            self._adopt(client.eval(_LOAD, 1, self._key, secrets.token_hex(8)))
        except redis.RedisError as exc:
            log.warning("cannot read the shared purge index yet (%s); the first lookup will",
                        type(exc).__name__)
        finally:
            client.close()

    def _adopt(self, fields: list[Any]) -> None:
        tokens = {
            bytes(fields[i]).decode(errors="replace"): bytes(fields[i + 1]).decode(errors="replace")
            for i in range(0, len(fields) - 1, 2)
        }
        self._tokens = tokens
        self._epoch = tokens.get("epoch", "").encode() or _UNLOADED

    async def bump(self, model: str | None) -> None:
        field = "all" if model is None else "m:" + model
        args = [field, secrets.token_hex(8), secrets.token_hex(8)]
        try:
            await self._store.run(
                "purge", lambda client: self._bump_script(keys=[self._key], args=args)
            )
        except StoreUnavailable:
            raise ServiceUnavailableError(
                "the shared cache store is unreachable; nothing was purged"
            ) from None
        try:
            await self._load()
        except StoreUnavailable:
            self._epoch = _UNLOADED  # our snapshot is stale: miss until the index is read


class RedisTier(CacheTier):
    """A tier in a Redis/Valkey server that several modelyard servers share."""

    name = "redis"
    options_type = RedisOptions

    def __init__(
        self, options: RedisOptions, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(options)
        # ``clock`` times only the back-off after a lost connection: entries expire on the
        # server's own clock.
        self._store = SharedStore(
            options.url, timeout_s=options.timeout_s, retry_s=options.retry_s, clock=clock,
            what="redis cache tier",
        )
        self._prefix = options.prefix.encode()
        self._ttl_ms = max(1, round(options.ttl_s * 1000)) if options.ttl_s else None
        self._generations = RedisGenerations(self._store, self._prefix + _INDEX.encode())
        self._url, self._timeout_s = options.url, options.timeout_s
        self._corrupt = 0

    def purge_generations(self) -> Generations:
        return self._generations

    def preload(self) -> None:
        """Read the shared purge index now (blocking; the cache opens in a worker thread)."""
        self._generations.preload(self._url, self._timeout_s)

    # -- CacheTier -----------------------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        stored_key = self._prefix + key
        try:
            stored = await self._store.run("get", lambda client: client.get(stored_key))
        except StoreUnavailable:
            return None
        if stored is None:
            return None
        try:
            return await self._maybe_in_thread(self._unpack, bytes(stored))
        except zstandard.ZstdError as exc:
            self._corrupt += 1
            log.warning("redis cache entry is not one this tier wrote (%s); removed", exc)
            await self.delete(key)
            return None

    async def set(self, key: bytes, value: bytes) -> None:
        if type(value) is not bytes:
            raise TypeError(f"redis tier values are bytes, not {type(value).__name__}")
        packed = await self._maybe_in_thread(self._pack, value)
        stored_key = self._prefix + key
        try:
            await self._store.run(
                "set", lambda client: client.set(stored_key, packed, px=self._ttl_ms)
            )
        except StoreUnavailable:
            pass  # the answer is good without a copy here

    async def delete(self, key: bytes) -> None:
        stored_key = self._prefix + key
        try:
            await self._store.run("delete", lambda client: client.delete(stored_key))
        except StoreUnavailable:
            pass

    async def clear(self) -> None:
        """Unlink every entry under the prefix (the purge index stays)."""
        try:
            await self._store.run("clear", self._clear)
        except StoreUnavailable:
            pass  # entries are unreachable anyway: ``purge(None)`` renewed every token

    async def _clear(self, client: Any) -> None:
        index = self._prefix + _INDEX.encode()
        batch: list[bytes] = []
        async for found in client.scan_iter(match=_glob_escape(self._prefix) + b"*",
                                            count=_SCAN_BATCH):
            if bytes(found) != index:
                batch.append(found)
            if len(batch) >= _SCAN_BATCH:
                await client.unlink(*batch)
                batch = []
        if batch:
            await client.unlink(*batch)

    async def close(self) -> None:
        await self._store.aclose()

    def stats(self) -> dict[str, Any]:
        return {
            "url": self._store.url,
            "prefix": self.options.prefix,
            "available": self._store.available,
            "corrupt": self._corrupt,
            "store_errors": dict(self._store.errors),
        }

    # -- values --------------------------------------------------------------------------

    def _pack(self, value: bytes) -> bytes:
        # One-shot: a shared ZstdCompressor is not safe across worker threads.
        return zstandard.compress(value, self.options.compression_level)

    @staticmethod
    def _unpack(stored: bytes) -> bytes:
        size = zstandard.frame_content_size(stored)
        if size < 0 or size > MAX_VALUE_BYTES:
            raise zstandard.ZstdError(f"a frame of undeclared or oversized content ({size})")
        return zstandard.ZstdDecompressor().decompress(stored, max_output_size=size)

    @staticmethod
    async def _maybe_in_thread(work: Callable[[bytes], bytes], data: bytes) -> bytes:
        if len(data) < _THREAD_BYTES:
            return work(data)
        return await asyncio.to_thread(work, data)


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a SCAN ``MATCH`` pattern that matches it literally."""
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)
