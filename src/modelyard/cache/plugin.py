"""The first-party cache tiers and the layer over them, registered like third-party plugins."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path

from modelyard.core.cache_settings import CacheSettings
from modelyard.core.cache_tier import CacheTier
from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginUnavailable
from modelyard.core.response_cache import ResponseCache

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
    from modelyard.cache.redis import RedisTier

    register(MemoryTier)
    register(DiskTier)
    # Registered with the others; its client (the ``redis`` extra) is imported only when a
    # ``redis`` tier is configured.
    register(RedisTier)


@hookimpl
def open_response_cache(
    settings: CacheSettings, tiers: Mapping[str, type[CacheTier]], directory: Path
) -> ResponseCache | None:
    from modelyard.cache.factory import build_cache_layer

    return build_cache_layer(settings, tiers, server_cache_dir=directory)
