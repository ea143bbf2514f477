"""The ``[cache]`` config section and the per-request directive, defined in the core."""

from __future__ import annotations

from modelyard.core.cache_settings import CacheSettings, TierSettings
from modelyard.core.response_cache import CacheDirective

__all__ = ["CacheDirective", "CacheSettings", "TierSettings"]
