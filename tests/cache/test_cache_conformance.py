"""The memory, disk and dedup tiers pass the conformance kit plugin authors run."""

from __future__ import annotations

from pathlib import Path

from modelyard.cache.dedup import DedupTier
from modelyard.cache.disk import DiskOptions, DiskTier
from modelyard.cache.memory import MemoryOptions, MemoryTier
from modelyard.core.cache_tier import CacheTier
from modelyard.testing import CacheTierConformance, FakeClock

BUDGET = 64 * 1024


class TestMemoryTierConformance(CacheTierConformance):
    tier = MemoryTier
    entry_point = "cache"
    options = {"max_bytes": BUDGET, "ttl_s": 60}
    ttl_s = 60.0
    max_bytes = BUDGET


class TestMemoryTierWithoutTtlConformance(CacheTierConformance):
    tier = MemoryTier
    options = {"max_bytes": BUDGET}
    max_bytes = BUDGET


class TestDiskTierConformance(CacheTierConformance):
    tier = DiskTier
    entry_point = "cache"
    options = {"max_bytes": 4 * BUDGET, "ttl_s": 60}
    ttl_s = 60.0
    max_bytes = 4 * BUDGET

    def make_tier(self, *, clock: FakeClock, directory: Path) -> CacheTier:
        # The cache layer fills in the directory; here it is the test's own.
        options = DiskOptions(directory=str(directory / "disk"), max_bytes=4 * BUDGET, ttl_s=60)
        return DiskTier(options, clock=clock)


class TestDedupTierConformance(CacheTierConformance):
    """Dedup wraps another tier; its TTL and bound are the wrapped tier's."""

    tier = DedupTier
    ttl_s = 60.0
    max_bytes = BUDGET

    def make_tier(self, *, clock: FakeClock, directory: Path) -> CacheTier:
        inner = MemoryTier(MemoryOptions(max_bytes=BUDGET, ttl_s=60), clock=clock)
        return DedupTier(inner)
