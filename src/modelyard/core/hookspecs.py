"""Every hook a modelyard plugin may implement."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from modelyard.core.auth import AuthProvider
    from modelyard.core.backend import Backend
    from modelyard.core.cache_settings import CacheSettings
    from modelyard.core.cache_tier import CacheTier
    from modelyard.core.cluster import Cluster
    from modelyard.core.context import ServerContext
    from modelyard.core.extensions import ApiExtension
    from modelyard.core.registry import VersionState
    from modelyard.core.response_cache import ResponseCache
    from modelyard.core.settings import Settings
    from modelyard.core.sources import SourceScheme
    from modelyard.core.views import VersionView

PROJECT = "modelyard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookimpl", "hookspec"]


@hookspec
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    """Register Backend subclasses by calling ``register(cls)`` once per class."""


@hookspec
def register_auth_providers(register: Callable[[type[AuthProvider]], None]) -> None:
    """Register AuthProvider subclasses by calling ``register(cls)`` once per class."""


@hookspec
def register_cache_tiers(register: Callable[[type[CacheTier]], None]) -> None:
    """Register CacheTier subclasses by calling ``register(cls)`` once per class."""


@hookspec
def register_source_schemes(register: Callable[[type[SourceScheme]], None]) -> None:
    """Register SourceScheme subclasses (``s3:``, ``hf:``, ...) by calling ``register(cls)``."""


@hookspec
def register_api_routes(register: Callable[[ApiExtension], None]) -> None:
    """Add HTTP routes under ``/ext/{name}`` by calling ``register(ApiExtension(...))``."""


@hookspec(firstresult=True)
def open_response_cache(
    settings: CacheSettings, tiers: Mapping[str, type[CacheTier]], directory: Path
) -> ResponseCache | None:
    """Build the response cache for an enabled ``[cache]`` section; the first answer wins."""


@hookspec(firstresult=True)
def open_cluster(settings: Settings) -> Cluster | None:
    """Build the cluster engine ``[cluster] engine`` names; the first answer wins."""


@hookspec
def server_startup(server: ServerContext) -> None:
    """Observe the server starting, after plugins load and before models load."""


@hookspec
def server_shutdown(server: ServerContext) -> None:
    """Observe the server stopping, after requests drain and before models unload."""


@hookspec
def model_version_state_changed(
    version: VersionView, old: VersionState | None, new: VersionState
) -> None:
    """Observe a model version moving between states (loading, ready, active, ...)."""
