"""The memory tier: LRU bounded by bytes, optional TTL on an injected clock."""

from __future__ import annotations

from modelyard.cache.memory import ENTRY_OVERHEAD, MemoryOptions, MemoryTier
from modelyard.testing import FakeClock


def _key(i: int) -> bytes:
    return i.to_bytes(32, "big")


async def test_evicts_least_recently_used_by_bytes_not_entries() -> None:
    entry = 1000
    tier = MemoryTier(MemoryOptions(max_bytes=3 * (entry + ENTRY_OVERHEAD)))
    for i in range(3):
        await tier.set(_key(i), bytes(entry))
    assert await tier.get(_key(0)) is not None  # 0 is now the most recently used
    await tier.set(_key(3), bytes(entry))
    assert await tier.get(_key(1)) is None
    assert await tier.get(_key(0)) is not None
    # Many small entries fit where three large ones did: the bound is bytes.
    for i in range(10, 30):
        await tier.set(_key(i), b"x")
    assert tier.stats()["entries"] > 3
    assert tier.stats()["bytes"] <= tier.stats()["max_bytes"]


async def test_a_value_larger_than_the_budget_is_not_stored_and_evicts_nothing() -> None:
    tier = MemoryTier(MemoryOptions(max_bytes=4096))
    await tier.set(_key(1), b"small")
    await tier.set(_key(2), bytes(10_000))
    assert await tier.get(_key(2)) is None
    assert await tier.get(_key(1)) == b"small"


async def test_ttl_follows_the_injected_clock(fake_clock: FakeClock) -> None:
    tier = MemoryTier(MemoryOptions(ttl_s=60), clock=fake_clock)
    await tier.set(_key(1), b"v")
    fake_clock.advance(59)
    assert await tier.get(_key(1)) == b"v"
    fake_clock.advance(1)
    assert await tier.get(_key(1)) is None


async def test_no_ttl_keeps_entries_whatever_the_time(fake_clock: FakeClock) -> None:
    tier = MemoryTier(MemoryOptions(), clock=fake_clock)
    await tier.set(_key(1), b"v")
    fake_clock.advance(10**9)
    assert await tier.get(_key(1)) == b"v"


async def test_delete_and_clear() -> None:
    tier = MemoryTier(MemoryOptions())
    await tier.set(_key(1), b"a")
    await tier.set(_key(2), b"b")
    await tier.delete(_key(1))
    await tier.delete(_key(9))  # absent: no error
    assert await tier.get(_key(1)) is None
    await tier.clear()
    assert await tier.get(_key(2)) is None
    assert tier.stats()["bytes"] == 0
