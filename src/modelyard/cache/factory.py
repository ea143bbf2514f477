"""Build a ``CacheLayer`` from the ``[cache]`` section and the registered tier classes."""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec

from modelyard.cache.config import CacheSettings
from modelyard.cache.dedup import DedupTier
from modelyard.cache.disk import DiskOptions, make_private_dir
from modelyard.cache.generations import Generations, PurgeGenerations, SharesPurges
from modelyard.cache.keys import load_or_create_secret
from modelyard.cache.layer import CacheLayer
from modelyard.core.cache_tier import CacheTier
from modelyard.core.errors import ConfigError

__all__ = ["build_cache_layer", "cache_directory"]

log = logging.getLogger(__name__)

_AT_PATH = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)


def cache_directory(settings: CacheSettings, server_cache_dir: Path) -> Path:
    """``[cache] directory``, else ``<cache_dir>/responses``."""
    if settings.directory:
        return Path(settings.directory).expanduser()
    return server_cache_dir / "responses"


def build_cache_layer(
    settings: CacheSettings,
    tier_classes: Mapping[str, type[CacheTier]],
    *,
    server_cache_dir: Path,
    clock: Callable[[], float] | None = None,
) -> CacheLayer | None:
    """The layer, or None when the cache is disabled; config mistakes raise ``ConfigError``.

    ``clock`` (tests: a ``FakeClock``) goes to every tier whose constructor takes a keyword
    ``clock``, for its TTLs; without it each tier keeps its own default. Opens files (secret,
    SQLite): call it off the event loop.
    """
    if not settings.enabled:
        return None
    if not settings.tiers:
        raise ConfigError("$.cache.tiers: an enabled cache needs at least one tier")
    directory = cache_directory(settings, server_cache_dir)
    make_private_dir(directory)
    tiers = [
        _build_tier(i, directory, settings, tier_classes, clock) for i in range(len(settings.tiers))
    ]
    _check_distinct_directories(tiers)
    shared = _shared_generations(tiers)
    if shared is not None and not settings.secret:
        log.warning(
            "a shared cache tier is configured without [cache] secret: servers with their own "
            "generated secrets never share an entry; give every server the same secret"
        )
    secret = settings.secret if settings.secret else load_or_create_secret(directory)
    generations = shared if shared is not None else PurgeGenerations(directory)
    return CacheLayer(tiers, secret=secret, generations=generations)


def _shared_generations(tiers: list[CacheTier]) -> Generations | None:
    """The purge index of the first tier shared between servers (e.g. ``redis``), if any."""
    for tier in tiers:
        inner = tier.inner if isinstance(tier, DedupTier) else tier
        if isinstance(inner, SharesPurges):
            inner.preload()
            return inner.purge_generations()
    return None


def _build_tier(
    index: int,
    directory: Path,
    settings: CacheSettings,
    tier_classes: Mapping[str, type[CacheTier]],
    clock: Callable[[], float] | None,
) -> CacheTier:
    spec = settings.tiers[index]
    where = f"$.cache.tiers[{index}]"
    cls = tier_classes.get(spec.tier)
    if cls is None:
        installed = ", ".join(sorted(tier_classes)) or "none"
        raise ConfigError(f"{where}.tier: unknown cache tier {spec.tier!r}; installed: {installed}")
    try:
        options = msgspec.convert(spec.options, cls.options_type)
    except msgspec.ValidationError as exc:
        raise ConfigError(_path_first(str(exc), f"{where}.options")) from None
    if isinstance(options, DiskOptions) and options.directory is None:
        options = msgspec.structs.replace(options, directory=str(directory / "disk"))
    takes_clock = "clock" in inspect.signature(cls).parameters
    if clock is not None and takes_clock:
        tier = cls(options, clock=clock)  # type: ignore[call-arg]
    else:
        tier = cls(options)
    return DedupTier(tier) if spec.dedup else tier


def _check_distinct_directories(tiers: list[CacheTier]) -> None:
    seen: set[str] = set()
    for tier in tiers:
        inner = tier.inner if isinstance(tier, DedupTier) else tier
        where = getattr(inner.options, "directory", None)
        if where is None:
            continue
        if where in seen:
            raise ConfigError(f"$.cache.tiers: two tiers share the directory {where!r}")
        seen.add(where)


def _path_first(message: str, prefix: str) -> str:
    """msgspec says 'Problem - at `$.a`'; config errors say '<prefix>.a: Problem'."""
    message = message.replace("Object contains unknown field", "unknown field")
    match = _AT_PATH.match(message)
    if match is None:
        return f"{prefix}: {message}"
    return f"{prefix}{match['path']}: {match['msg']}"
