"""The disk tier: raw bytes only (never pickle), zstd + checksum, bounded, TTL, restart-safe."""

from __future__ import annotations

import os
import pickle
import pickletools
import sqlite3
import stat
from pathlib import Path
from typing import Any

import diskcache
import pytest

from modelyard.cache.disk import DiskOptions, DiskTier
from modelyard.testing import FakeClock

SMALL = b"a response body " * 20  # compresses well: stored inside the SQLite row
LARGE = os.urandom(64 * 1024)  # incompressible, over diskcache's 32 KiB: stored as a file


def _key(i: int) -> bytes:
    return i.to_bytes(32, "big")


def _tier(directory: Path, clock: FakeClock | None = None, **options: Any) -> DiskTier:
    opts = DiskOptions(directory=str(directory), **options)
    return DiskTier(opts) if clock is None else DiskTier(opts, clock=clock)


def _db(directory: Path) -> sqlite3.Connection:
    return sqlite3.connect(directory / diskcache.core.DBNAME)


def _row(directory: Path, key: bytes) -> tuple[int, int, str | None, bytes | None] | None:
    with _db(directory) as db:
        return db.execute(
            "SELECT rowid, mode, filename, value FROM Cache WHERE key = ?", (key,)
        ).fetchone()


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pickling or unpickling anywhere fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(pickletools, "optimize", refuse)


async def test_round_trip_small_and_large_values_without_pickle(
    tmp_path: Path, no_pickle: None
) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), SMALL)
    await tier.set(_key(2), LARGE)
    assert await tier.get(_key(1)) == SMALL
    assert await tier.get(_key(2)) == LARGE
    assert await tier.get(_key(3)) is None
    # Stored raw: SQLite blob for the small one, a file for the large one; never mode pickle.
    assert _row(tmp_path / "d", _key(1))[1] == diskcache.core.MODE_RAW  # type: ignore[index]
    assert _row(tmp_path / "d", _key(2))[1] == diskcache.core.MODE_BINARY  # type: ignore[index]
    await tier.close()


async def test_values_are_compressed(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), SMALL)
    stored = _row(tmp_path / "d", _key(1))[3]  # type: ignore[index]
    assert stored is not None and len(stored) < len(SMALL)
    await tier.close()


async def test_non_bytes_keys_and_values_are_refused(tmp_path: Path, no_pickle: None) -> None:
    tier = _tier(tmp_path / "d")
    with pytest.raises(TypeError):
        tier._cache.set("a str key", b"v")
    with pytest.raises(TypeError):
        tier._cache.set(_key(1), {"a": "dict"})
    await tier.close()


async def test_entries_survive_a_restart(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), SMALL)
    await tier.set(_key(2), LARGE)
    await tier.close()
    reopened = _tier(tmp_path / "d")
    assert await reopened.get(_key(1)) == SMALL
    assert await reopened.get(_key(2)) == LARGE
    await reopened.close()


async def test_ttl_follows_the_injected_clock_across_a_restart(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    tier = _tier(tmp_path / "d", fake_clock, ttl_s=60)
    await tier.set(_key(1), SMALL)
    fake_clock.advance(59)
    assert await tier.get(_key(1)) == SMALL
    await tier.close()
    fake_clock.advance(1)
    reopened = _tier(tmp_path / "d", fake_clock, ttl_s=60)
    assert await reopened.get(_key(1)) is None
    assert _row(tmp_path / "d", _key(1)) is None  # an expired entry is removed when seen
    await reopened.close()


async def test_evicts_by_bytes(tmp_path: Path) -> None:
    limit = 512 * 1024
    tier = _tier(tmp_path / "d", max_bytes=limit)
    for i in range(24):
        await tier.set(_key(i), os.urandom(64 * 1024))
    stats = tier.stats()
    assert stats["bytes"] <= limit + 64 * 1024 + 1024
    assert stats["entries"] < 24
    assert await tier.get(_key(0)) is None  # the oldest went first
    assert await tier.get(_key(23)) is not None
    await tier.close()


@pytest.mark.parametrize("offset", [0, 4, 6, 14, 30, 60, -1], ids=lambda o: f"byte{o}")
async def test_a_flipped_byte_in_the_row_is_a_miss_and_is_removed(
    tmp_path: Path, offset: int
) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), SMALL)
    rowid, _, _, value = _row(tmp_path / "d", _key(1))  # type: ignore[misc]
    assert value is not None
    corrupt = bytearray(value)
    corrupt[offset] ^= 0x01
    with _db(tmp_path / "d") as db:
        db.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(corrupt), rowid))
    assert await tier.get(_key(1)) is None
    assert _row(tmp_path / "d", _key(1)) is None
    await tier.close()


async def test_a_flipped_byte_in_the_value_file_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), LARGE)
    _, _, filename, _ = _row(tmp_path / "d", _key(1))  # type: ignore[misc]
    assert filename is not None
    path = tmp_path / "d" / filename
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x80
    path.write_bytes(bytes(data))
    assert await tier.get(_key(1)) is None
    assert _row(tmp_path / "d", _key(1)) is None
    assert not path.exists()
    await tier.close()


async def test_a_truncated_or_missing_value_file_is_a_miss(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), LARGE)
    await tier.set(_key(2), LARGE)
    (tmp_path / "d" / _row(tmp_path / "d", _key(1))[2]).write_bytes(b"MYD1")  # type: ignore[index,operator]
    (tmp_path / "d" / _row(tmp_path / "d", _key(2))[2]).unlink()  # type: ignore[index,operator]
    assert await tier.get(_key(1)) is None
    assert await tier.get(_key(2)) is None
    await tier.close()


async def test_a_planted_pickle_is_never_unpickled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CVE-2025-69872: a row written by a stock diskcache (mode pickle) must not be loaded."""
    tier = _tier(tmp_path / "d")
    await tier.set(_key(2), SMALL)
    planter = diskcache.Cache(str(tmp_path / "d"))
    planter.set(_key(1), {"planted": True})  # small pickle, kept in the row
    planter.set(_key(3), list(range(20_000)))  # large pickle, kept in a file
    planter.close()
    assert _row(tmp_path / "d", _key(1))[1] == diskcache.core.MODE_PICKLE  # type: ignore[index]
    assert _row(tmp_path / "d", _key(3))[1] == diskcache.core.MODE_PICKLE  # type: ignore[index]

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    for name in ("loads", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    assert await tier.get(_key(1)) is None
    assert await tier.get(_key(3)) is None
    assert _row(tmp_path / "d", _key(1)) is None
    assert _row(tmp_path / "d", _key(3)) is None
    assert await tier.get(_key(2)) == SMALL
    await tier.close()


async def test_directory_is_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        tier = _tier(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
    await tier.close()


async def test_an_existing_directory_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o755)
    os.chmod(tmp_path / "d", 0o755)
    tier = _tier(tmp_path / "d")
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    await tier.close()


async def test_delete_and_clear(tmp_path: Path) -> None:
    tier = _tier(tmp_path / "d")
    await tier.set(_key(1), SMALL)
    await tier.set(_key(2), LARGE)
    await tier.delete(_key(1))
    assert await tier.get(_key(1)) is None
    await tier.clear()
    assert await tier.get(_key(2)) is None
    assert tier.stats()["entries"] == 0
    await tier.close()
