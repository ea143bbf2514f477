"""The response cache: tiers, keys and the layer in front of the backends.

Names load on first use, so ``modelyard.cache.config`` (imported by the core settings) needs
none of the ``cache`` extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelyard.cache.codec import ResultCodec
    from modelyard.cache.config import CacheDirective, CacheSettings, TierSettings
    from modelyard.cache.dedup import DedupTier
    from modelyard.cache.disk import DiskOptions, DiskTier
    from modelyard.cache.factory import build_cache_layer, cache_directory
    from modelyard.cache.generations import PurgeGenerations
    from modelyard.cache.keys import KeyFields, is_cacheable, weights_digest
    from modelyard.cache.layer import CacheLayer, Outcome, replay_stream
    from modelyard.cache.memory import MemoryOptions, MemoryTier
    from modelyard.cache.redis import RedisOptions, RedisTier

__all__ = [
    "CacheDirective",
    "CacheLayer",
    "CacheSettings",
    "DedupTier",
    "DiskOptions",
    "DiskTier",
    "KeyFields",
    "MemoryOptions",
    "MemoryTier",
    "Outcome",
    "PurgeGenerations",
    "RedisOptions",
    "RedisTier",
    "ResultCodec",
    "TierSettings",
    "build_cache_layer",
    "cache_directory",
    "is_cacheable",
    "replay_stream",
    "weights_digest",
]

_HOME = {
    "CacheLayer": "layer", "Outcome": "layer", "PurgeGenerations": "generations",
    "replay_stream": "layer", "CacheDirective": "config", "CacheSettings": "config",
    "TierSettings": "config",
    "DedupTier": "dedup", "DiskOptions": "disk", "DiskTier": "disk", "KeyFields": "keys",
    "is_cacheable": "keys", "weights_digest": "keys", "MemoryOptions": "memory",
    "MemoryTier": "memory", "RedisOptions": "redis", "RedisTier": "redis",
    "ResultCodec": "codec", "build_cache_layer": "factory",
    "cache_directory": "factory",
}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
