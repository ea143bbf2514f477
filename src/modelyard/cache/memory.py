"""The ``memory`` tier: an in-process LRU bounded by bytes, with an optional TTL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import cachetools
import msgspec
from msgspec import Meta

from modelyard.core.cache_tier import CacheTier

__all__ = ["MemoryOptions", "MemoryTier"]

#: Rough per-entry cost beyond the value itself (the 32-byte key object, dict slot, LRU link),
#: so that many tiny entries still count against the byte budget.
ENTRY_OVERHEAD = 160


class MemoryOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Budget for stored values plus a fixed per-entry overhead; least recently used go first.
    max_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024 * 1024
    #: Seconds an entry lives; None keeps it until evicted.
    ttl_s: Annotated[float, Meta(gt=0)] | None = None


def _entry_size(value: bytes) -> int:
    return len(value) + ENTRY_OVERHEAD


class MemoryTier(CacheTier):
    """Values live in this process only: fastest, lost on restart."""

    name = "memory"
    options_type = MemoryOptions

    def __init__(
        self, options: MemoryOptions, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(options)
        self._entries: cachetools.Cache[bytes, bytes]
        if options.ttl_s is None:
            self._entries = cachetools.LRUCache(options.max_bytes, getsizeof=_entry_size)
        else:
            self._entries = cachetools.TTLCache(
                options.max_bytes, options.ttl_s, timer=clock, getsizeof=_entry_size
            )

    async def get(self, key: bytes) -> bytes | None:
        return self._entries.get(key)

    async def set(self, key: bytes, value: bytes) -> None:
        try:
            self._entries[key] = value
        except ValueError:
            # Larger than the whole budget: not worth evicting everything else for.
            self._entries.pop(key, None)

    async def delete(self, key: bytes) -> None:
        self._entries.pop(key, None)

    async def clear(self) -> None:
        self._entries.clear()

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._entries),
            "bytes": int(self._entries.currsize),
            "max_bytes": int(self._entries.maxsize),
        }
