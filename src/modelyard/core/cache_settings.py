"""The ``[cache]`` config section; the tiers and the layer live in ``modelyard.cache``."""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

__all__ = ["CacheSettings", "TierSettings"]


class TierSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """One tier: its registered name, its options, and whether to content-address it."""

    tier: str
    #: Validated against the tier's ``options_type``.
    options: dict[str, Any] = field(default_factory=dict)
    #: Store identical response bodies once in this tier (keys point at a blake3 hash).
    dedup: bool = False


def _default_tiers() -> list[TierSettings]:
    return [TierSettings(tier="memory")]


class CacheSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[cache]``: the response cache for deterministic requests."""

    enabled: bool = False
    #: Holds the secret, purge generations and the default disk tier; created 0700.
    #: Defaults to ``<cache_dir>/responses``.
    directory: str | None = None
    #: Keys cache keys and entry MACs; None generates one into ``<directory>/secret`` (0600).
    #: Servers sharing a tier (e.g. Redis) need the same secret.
    secret: str | None = None
    #: Read in order; a hit in a lower tier is copied into the tiers above it.
    tiers: list[TierSettings] = field(default_factory=_default_tiers)
