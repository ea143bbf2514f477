"""The ``disk`` tier: diskcache holding raw bytes only, zstd-compressed behind a checksum.

diskcache pickles any value that is not bytes/str/int/float and unpickles any row whose mode
says "pickle" (CVE-2025-69872: whoever can write the cache directory can run code in the
server). ``_RawBytesDisk`` refuses both directions, so a row that was not written as raw bytes
is a corrupt entry: a miss that gets removed, never unpickled.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import diskcache
import msgspec
import zstandard
from blake3 import blake3
from msgspec import Meta

from modelyard.core.cache_tier import CacheTier

__all__ = ["DiskOptions", "DiskTier", "UnsafeEntry"]

log = logging.getLogger(__name__)

# magic, format flags, expires_at (wall-clock seconds, 0 = never), plaintext length, checksum
_HEADER = struct.Struct(">4sBdQ32s")
_MAGIC = b"MYD1"
_CHECKED = struct.Struct(">4sBdQ")  # the part of the header the checksum also covers


class DiskOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Where entries live; None puts them under the cache directory (``<cache dir>/disk``).
    directory: str | None = None
    #: Size the directory is culled back to (SQLite pages plus value files).
    max_bytes: Annotated[int, Meta(ge=64 * 1024)] = 1024 * 1024 * 1024
    #: Seconds an entry lives; None keeps it until evicted.
    ttl_s: Annotated[float, Meta(gt=0)] | None = None
    compression_level: Annotated[int, Meta(ge=1, le=22)] = 3
    #: "least-recently-used" costs a small write per hit; "least-recently-stored" does not.
    eviction_policy: Literal["least-recently-used", "least-recently-stored"] = "least-recently-used"


class UnsafeEntry(Exception):  # reads as what was found
    """A stored row that was not written by this tier as raw bytes (e.g. a pickle)."""


class _RawBytesDisk(diskcache.Disk):  # type: ignore[misc]
    """A diskcache Disk that only ever stores and returns raw bytes: pickle is unreachable."""

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not bytes:
            raise TypeError(f"disk tier keys are bytes, not {type(key).__name__}")
        return super().put(key)  # type: ignore[no-any-return]

    def get(self, key: Any, raw: bool) -> bytes:
        if not raw:
            raise UnsafeEntry("a pickled key")
        return bytes(key)

    def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
        if read or type(value) is not bytes:
            raise TypeError(f"disk tier values are bytes, not {type(value).__name__}")
        return super().store(value, False, key=key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
        if read or mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY):
            raise UnsafeEntry(f"a row stored in mode {mode}")
        data = super().fetch(mode, filename, value, False)
        if type(data) is not bytes:
            raise UnsafeEntry(f"a row holding {type(data).__name__}")
        return data


class CorruptEntry(Exception):
    """A value whose header, compression or checksum does not hold up."""


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700: entries are other tenants' answers."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _checksum(checked_header: bytes, plaintext: bytes) -> bytes:
    return blake3(checked_header + plaintext).digest()


def pack(plaintext: bytes, *, expires_at: float, level: int) -> bytes:
    """Header + zstd frame; the checksum covers the header fields and the plaintext."""
    checked = _CHECKED.pack(_MAGIC, 0, expires_at, len(plaintext))
    header = _HEADER.pack(_MAGIC, 0, expires_at, len(plaintext), _checksum(checked, plaintext))
    return header + zstandard.compress(plaintext, level)


def unpack(stored: bytes, *, now: float) -> bytes | None:
    """The plaintext, None when expired; raises ``CorruptEntry`` when anything is off."""
    if len(stored) < _HEADER.size:
        raise CorruptEntry("shorter than its header")
    magic, flags, expires_at, length, checksum = _HEADER.unpack_from(stored)
    if magic != _MAGIC or flags != 0:
        raise CorruptEntry("unknown header")
    try:
        plaintext = zstandard.decompress(stored[_HEADER.size:], max_output_size=length)
    except zstandard.ZstdError as exc:
        raise CorruptEntry(f"zstd: {exc}") from None
    if len(plaintext) != length:
        raise CorruptEntry("length differs from its header")
    if _checksum(_CHECKED.pack(magic, flags, expires_at, length), plaintext) != checksum:
        raise CorruptEntry("checksum mismatch")
    if expires_at and now >= expires_at:
        return None
    return plaintext


class DiskTier(CacheTier):
    """Survives restarts; bounded by ``max_bytes``; a bad entry is a miss and is removed."""

    name = "disk"
    options_type = DiskOptions

    def __init__(self, options: DiskOptions, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(options)
        if options.directory is None:
            raise ValueError("disk tier needs a directory (the cache layer fills it in)")
        self.directory = Path(options.directory).expanduser()
        # Must be wall-clock time: expiry times outlive the process.
        self._clock = clock
        make_private_dir(self.directory)
        self._cache = diskcache.Cache(
            str(self.directory),
            disk=_RawBytesDisk,
            size_limit=options.max_bytes,
            eviction_policy=options.eviction_policy,
            # diskcache drops up to cull_limit entries per set once over the limit; its
            # default 10 can empty a small cache at once, 2 still outpaces one insert.
            cull_limit=2,
            statistics=False,
        )

    # -- sync halves, run in a worker thread ---------------------------------------------

    def _get(self, key: bytes) -> bytes | None:
        try:
            stored = self._cache.get(key)
            if stored is None:
                return None
            plaintext = unpack(stored, now=self._clock())
        except (UnsafeEntry, CorruptEntry, OSError) as exc:
            log.warning("disk cache entry in %s is corrupt (%s); removed", self.directory, exc)
            self._cache.delete(key)
            return None
        if plaintext is None:
            self._cache.delete(key)
        return plaintext

    def _set(self, key: bytes, value: bytes) -> None:
        ttl = self.options.ttl_s
        expires_at = 0.0 if ttl is None else self._clock() + ttl
        packed = pack(value, expires_at=expires_at, level=self.options.compression_level)
        # diskcache's own expiry (on its own clock) only lets it cull dead rows early.
        self._cache.set(key, packed, expire=ttl)

    # -- CacheTier -----------------------------------------------------------------------

    async def get(self, key: bytes) -> bytes | None:
        return await asyncio.to_thread(self._get, key)

    async def set(self, key: bytes, value: bytes) -> None:
        await asyncio.to_thread(self._set, key, value)

    async def delete(self, key: bytes) -> None:
        await asyncio.to_thread(self._cache.delete, key)

    async def clear(self) -> None:
        await asyncio.to_thread(self._cache.clear)

    async def close(self) -> None:
        await asyncio.to_thread(self._cache.close)

    def stats(self) -> dict[str, Any]:
        return {
            "entries": len(self._cache),
            "bytes": int(self._cache.volume()),
            "max_bytes": self.options.max_bytes,
            "directory": str(self.directory),
        }
