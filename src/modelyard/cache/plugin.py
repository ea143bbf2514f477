"""The first-party cache tiers, registered through the same hook as third-party ones."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from modelyard.core.cache_tier import CacheTier
from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginUnavailable

#: The ``cache`` extra; checked without importing so a missing one is a skip, not a crash.
REQUIRED = ("blake3", "zstandard", "diskcache", "cachetools")


@hookimpl
def register_cache_tiers(register: Callable[[type[CacheTier]], None]) -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise PluginUnavailable(
            f"install modelyard[cache] for the response cache (missing: {', '.join(missing)})"
        )
    from modelyard.cache.disk import DiskTier
    from modelyard.cache.memory import MemoryTier

    register(MemoryTier)
    register(DiskTier)
