"""Content addressing: identical response bodies are stored once, keys point at their hash.

``DedupTier`` wraps any tier (memory, disk, a plugin's). For a key it stores a pointer
(``p`` + key -> blake3 of the body) and, once per distinct body, the body itself
(``c`` + hash -> body). A body is checked against its hash on every read, so a pointer can
never lead to anything but the bytes that were hashed.

Deleting a key removes its pointer only, since other keys may share the body; bodies no key
points at are never read again and leave through the wrapped tier's LRU or TTL.
"""

from __future__ import annotations

import logging
from typing import Any

from blake3 import blake3

from modelyard.core.backend import NoOptions
from modelyard.core.cache_tier import CacheTier

__all__ = ["DedupTier"]

log = logging.getLogger(__name__)

_POINTER = b"\x00dedup/p/"
_CONTENT = b"\x00dedup/c/"
_HASH_BYTES = 32


class DedupTier(CacheTier):
    """Stores each distinct value once in ``inner``; ``stats()`` reports the dedup ratio."""

    name = "dedup"
    options_type = NoOptions

    def __init__(self, inner: CacheTier, options: NoOptions | None = None) -> None:
        super().__init__(options if options is not None else NoOptions())
        self.inner = inner
        self._writes = 0
        self._unique_writes = 0
        self._logical_bytes = 0
        self._stored_bytes = 0

    async def get(self, key: bytes) -> bytes | None:
        digest = await self.inner.get(_POINTER + key)
        if digest is None:
            return None
        if len(digest) != _HASH_BYTES:
            log.warning("dedup pointer is corrupt; removed")
            await self.inner.delete(_POINTER + key)
            return None
        body = await self.inner.get(_CONTENT + digest)
        if body is None:
            # The body was evicted first: the pointer leads nowhere now.
            await self.inner.delete(_POINTER + key)
            return None
        if blake3(body).digest() != digest:
            log.warning("dedup body does not match its hash; removed")
            await self.inner.delete(_CONTENT + digest)
            await self.inner.delete(_POINTER + key)
            return None
        return body

    async def set(self, key: bytes, value: bytes) -> None:
        digest = blake3(value).digest()
        self._writes += 1
        self._logical_bytes += len(value)
        if await self.inner.get(_CONTENT + digest) is None:
            await self.inner.set(_CONTENT + digest, value)
            self._unique_writes += 1
            self._stored_bytes += len(value)
        await self.inner.set(_POINTER + key, digest)

    async def delete(self, key: bytes) -> None:
        await self.inner.delete(_POINTER + key)

    async def clear(self) -> None:
        await self.inner.clear()

    async def close(self) -> None:
        await self.inner.close()

    def stats(self) -> dict[str, Any]:
        """Counts since start: ``dedup_ratio`` is bytes written by callers / bytes stored."""
        ratio = self._logical_bytes / self._stored_bytes if self._stored_bytes else 1.0
        inner_stats = getattr(self.inner, "stats", None)
        return {
            "writes": self._writes,
            "unique_writes": self._unique_writes,
            "logical_bytes": self._logical_bytes,
            "stored_bytes": self._stored_bytes,
            "dedup_ratio": round(ratio, 3),
            "inner": {"tier": self.inner.name, **(inner_stats() if callable(inner_stats) else {})},
        }
