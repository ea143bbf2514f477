"""``CacheTierConformance``: get/set/delete/clear, TTL, the size bound and bytes only."""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest

from modelyard.core.cache_tier import CacheTier
from modelyard.testing.clock import FakeClock
from modelyard.testing.conformance._common import (
    ConformanceError,
    check_options_type,
    host_for_entry_point,
    provided_by,
    run_async,
)

__all__ = ["CacheTierConformance"]


def _key(i: int) -> bytes:
    return b"conformance/" + i.to_bytes(20, "big")


class _PickleTrap:
    """A value that records any attempt to pickle it (a tier must never pickle)."""

    pickled = False

    def __reduce__(self) -> Any:
        type(self).pickled = True
        raise TypeError("a cache tier tried to pickle a value")


class CacheTierConformance:
    """The cache-tier contract as pytest tests: subclass it as ``Test...`` and configure it.

    Set ``tier`` (or override ``make_tier``), ``options``, and ``ttl_s`` / ``max_bytes`` when
    the options configure a TTL or a size bound. The kit injects a ``FakeClock`` when the
    tier's constructor takes ``clock``, so TTL checks never sleep.
    """

    #: The CacheTier subclass under test.
    tier: ClassVar[type[CacheTier] | None] = None
    #: The entry point in the ``modelyard`` group that registers ``tier``; None skips the check.
    entry_point: ClassVar[str | None] = None
    #: The tier's options table.
    options: ClassVar[Mapping[str, Any]] = {}
    #: Seconds an entry lives under ``options``; None: the tier has no TTL configured.
    ttl_s: ClassVar[float | None] = None
    #: The byte budget under ``options``; None: no size bound configured.
    max_bytes: ClassVar[int | None] = None
    timeout_s: ClassVar[float] = 30.0

    def tier_class(self) -> type[CacheTier]:
        if self.tier is None:
            raise ConformanceError("set tier (the CacheTier subclass) or override make_tier")
        return self.tier

    def make_tier(self, *, clock: FakeClock, directory: Path) -> CacheTier:
        """A fresh tier; ``clock`` goes to constructors that take one. Override to build it."""
        cls = self.tier_class()
        options = check_options_type(f"cache tier {cls.name!r}", cls.options_type, self.options)
        if "clock" in inspect.signature(cls).parameters:
            return cls(options, clock=clock)  # type: ignore[call-arg]
        return cls(options)

    @contextlib.asynccontextmanager
    async def opened(self, clock: FakeClock, directory: Path) -> AsyncIterator[CacheTier]:
        tier = self.make_tier(clock=clock, directory=directory)
        try:
            yield tier
        finally:
            await tier.close()

    def _run(
        self, what: str, directory: Path, check: Callable[[CacheTier, FakeClock], Awaitable[None]],
        clock: FakeClock | None = None,
    ) -> None:
        clock = clock or FakeClock()

        async def run() -> None:
            async with self.opened(clock, directory) as tier:
                await check(tier, clock)

        run_async(run(), timeout_s=self.timeout_s, what=what)

    # -- the checks -----------------------------------------------------------------------

    def test_entry_point_registers_the_tier(self) -> None:
        if self.entry_point is None:
            pytest.skip("entry_point is not set")
        cls = self.tier_class()
        host = host_for_entry_point(self.entry_point)
        names = provided_by(host, self.entry_point, "cache_tiers")
        if host.cache_tiers.get(cls.name) is not cls:
            raise ConformanceError(
                f"entry point {self.entry_point!r} does not register {cls.__qualname__} as "
                f"cache tier {cls.name!r} (it registers: {', '.join(names) or 'none'})"
            )

    def test_options_reject_unknown_fields(self) -> None:
        cls = self.tier_class()
        check_options_type(f"cache tier {cls.name!r}", cls.options_type, self.options)

    def test_get_set_delete_clear(self, tmp_path: Path) -> None:
        async def check(tier: CacheTier, clock: FakeClock) -> None:
            if await tier.get(_key(1)) is not None:
                raise ConformanceError("get of a key never set returned a value, not None")
            value = bytes(range(256)) * 4
            await tier.set(_key(1), value)
            got = await tier.get(_key(1))
            if type(got) is not bytes or got != value:
                raise ConformanceError(
                    f"get returned {_show(got)} for a key set to {len(value)} bytes"
                )
            await tier.set(_key(1), b"second")
            if await tier.get(_key(1)) != b"second":
                raise ConformanceError("set of an existing key did not replace its value")
            await tier.set(_key(2), b"")
            if await tier.get(_key(2)) != b"":
                raise ConformanceError("an empty value came back as a miss; b'' is a value")
            await tier.delete(_key(1))
            if await tier.get(_key(1)) is not None:
                raise ConformanceError("get after delete returned a value")
            await tier.delete(_key(99))  # deleting a missing key is not an error
            await tier.set(_key(3), b"three")
            await tier.clear()
            if await tier.get(_key(2)) is not None or await tier.get(_key(3)) is not None:
                raise ConformanceError("get after clear returned a value")

        self._run("get/set/delete/clear", tmp_path, check)

    def test_entries_expire_after_their_ttl(self, tmp_path: Path) -> None:
        ttl = self.ttl_s
        if ttl is None:
            pytest.skip("ttl_s is not set: the options configure no TTL")
        overridden = type(self).make_tier is not CacheTierConformance.make_tier
        if not overridden and "clock" not in inspect.signature(self.tier_class()).parameters:
            pytest.skip("the tier's constructor takes no clock: its TTL cannot be moved past")
        clock = FakeClock(start=1_000_000.0)

        async def check(tier: CacheTier, clock: FakeClock) -> None:
            await tier.set(_key(1), b"lives")
            clock.advance(ttl * 0.5)
            if await tier.get(_key(1)) != b"lives":
                raise ConformanceError(f"an entry was gone after half its TTL ({ttl * 0.5:g} s)")
            clock.advance(ttl)
            got = await tier.get(_key(1))
            if got is not None:
                raise ConformanceError(
                    f"an entry was still served {ttl * 1.5:g} s after it was set with a TTL of "
                    f"{ttl:g} s (does the tier take its time from the injected clock?)"
                )

        self._run("TTL", tmp_path, check, clock)

    def test_the_size_bound_holds(self, tmp_path: Path) -> None:
        budget = self.max_bytes
        if budget is None:
            pytest.skip("max_bytes is not set: the options configure no size bound")
        size, count = max(1, budget // 16), 64

        async def check(tier: CacheTier, clock: FakeClock) -> None:
            values = {}
            for i in range(count):  # incompressible: a compressing tier must still evict
                values[i] = os.urandom(size)
                await tier.set(_key(i), values[i])
            kept = 0
            for i, value in values.items():
                got = await tier.get(_key(i))
                if got is not None:
                    if got != value:
                        raise ConformanceError(f"entry {i} came back with other bytes")
                    kept += len(got)
            if kept > budget:
                raise ConformanceError(
                    f"the tier holds {kept} bytes of values after {count * size} were written "
                    f"with max_bytes = {budget}"
                )
            if await tier.get(_key(count - 1)) is None:
                raise ConformanceError(
                    "the newest entry was evicted; a bounded tier evicts the oldest first"
                )

        self._run("the size bound", tmp_path, check)

    def test_values_are_bytes_never_pickled(self, tmp_path: Path) -> None:
        async def check(tier: CacheTier, clock: FakeClock) -> None:
            _PickleTrap.pickled = False
            try:
                await tier.set(_key(7), _PickleTrap())  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - refusing a non-bytes value is correct
                pass
            if _PickleTrap.pickled:
                raise ConformanceError(
                    "the tier pickled a value that is not bytes; a tier stores bytes only "
                    "(refuse anything else with TypeError)"
                )

        self._run("a non-bytes value", tmp_path, check)


def _show(value: Any) -> str:
    if value is None:
        return "None (a miss)"
    if isinstance(value, bytes):
        return f"{len(value)} other bytes"
    return f"a {type(value).__name__}, not bytes"
