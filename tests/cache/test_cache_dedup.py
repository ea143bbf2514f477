"""Content addressing: identical bodies are stored once; a body must match its hash."""

from __future__ import annotations

from pathlib import Path

from blake3 import blake3

from modelyard.cache.dedup import DedupTier
from modelyard.cache.disk import DiskOptions, DiskTier
from modelyard.cache.memory import MemoryOptions, MemoryTier


def _key(i: int) -> bytes:
    return i.to_bytes(32, "big")


async def test_identical_bodies_are_stored_once() -> None:
    inner = MemoryTier(MemoryOptions())
    tier = DedupTier(inner)
    body = b"the same answer for everyone " * 50
    for i in range(10):
        await tier.set(_key(i), body)
    await tier.set(_key(99), b"another answer")
    for i in range(10):
        assert await tier.get(_key(i)) == body
    assert await tier.get(_key(99)) == b"another answer"
    # 11 pointers + 2 bodies, not 11 bodies.
    assert inner.stats()["entries"] == 13
    assert inner.stats()["bytes"] < 3 * len(body)
    stats = tier.stats()
    assert stats["writes"] == 11
    assert stats["unique_writes"] == 2
    assert stats["dedup_ratio"] == round((10 * len(body) + 14) / (len(body) + 14), 3)


async def test_deleting_a_key_leaves_bodies_other_keys_share() -> None:
    tier = DedupTier(MemoryTier(MemoryOptions()))
    await tier.set(_key(1), b"shared")
    await tier.set(_key(2), b"shared")
    await tier.delete(_key(1))
    assert await tier.get(_key(1)) is None
    assert await tier.get(_key(2)) == b"shared"


async def test_a_body_that_does_not_match_its_hash_is_a_miss_and_removed() -> None:
    inner = MemoryTier(MemoryOptions())
    tier = DedupTier(inner)
    await tier.set(_key(1), b"genuine")
    digest = blake3(b"genuine").digest()
    await inner.set(b"\x00dedup/c/" + digest, b"forged")
    assert await tier.get(_key(1)) is None
    assert await inner.get(b"\x00dedup/p/" + _key(1)) is None
    assert await inner.get(b"\x00dedup/c/" + digest) is None


async def test_a_pointer_whose_body_was_evicted_is_a_miss() -> None:
    inner = MemoryTier(MemoryOptions())
    tier = DedupTier(inner)
    await tier.set(_key(1), b"body")
    await inner.delete(b"\x00dedup/c/" + blake3(b"body").digest())
    assert await tier.get(_key(1)) is None
    await inner.set(b"\x00dedup/p/" + _key(2), b"not a hash")
    assert await tier.get(_key(2)) is None


async def test_dedup_over_disk_survives_a_restart(tmp_path: Path) -> None:
    options = DiskOptions(directory=str(tmp_path / "d"))
    tier = DedupTier(DiskTier(options))
    await tier.set(_key(1), b"persisted")
    await tier.set(_key(2), b"persisted")
    await tier.close()
    reopened = DedupTier(DiskTier(options))
    assert await reopened.get(_key(1)) == b"persisted"
    assert await reopened.get(_key(2)) == b"persisted"
    assert reopened.stats()["inner"]["entries"] == 3
    await reopened.close()
