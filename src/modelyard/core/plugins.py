"""The one owner of the PluginManager: loading, isolation of broken plugins, typed hook calls."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import pluggy

from modelyard.core import hookspecs
from modelyard.core.auth import AuthProvider
from modelyard.core.backend import Backend
from modelyard.core.cache_tier import CacheTier
from modelyard.core.extensions import ApiExtension
from modelyard.core.sources import SourceScheme

if TYPE_CHECKING:
    from modelyard.core.cache_settings import CacheSettings
    from modelyard.core.cluster import Cluster
    from modelyard.core.context import ServerContext
    from modelyard.core.registry import VersionState
    from modelyard.core.response_cache import ResponseCache
    from modelyard.core.settings import Settings
    from modelyard.core.views import VersionView

__all__ = ["ENTRY_POINT_GROUP", "PluginHost", "PluginRecord", "PluginUnavailable"]

ENTRY_POINT_GROUP = "modelyard"
ALLOW_ENV = "MODELYARD_PLUGINS"

log = logging.getLogger(__name__)

_E = TypeVar("_E", Backend, AuthProvider, CacheTier, SourceScheme)


class PluginUnavailable(Exception):  # reads as a state, like StopIteration
    """Raised by a registration hook when an optional dependency is missing: skip, not fail."""


class PluginRecord(msgspec.Struct):
    """What ``modelyard plugins`` and ``GET /v1/plugins`` show about one plugin."""

    name: str
    source: str
    status: str  # "loaded" | "failed" | "skipped" | "missing"
    version: str = ""
    backends: list[str] = msgspec.field(default_factory=list)
    auth_providers: list[str] = msgspec.field(default_factory=list)
    cache_tiers: list[str] = msgspec.field(default_factory=list)
    source_schemes: list[str] = msgspec.field(default_factory=list)
    api_extensions: list[str] = msgspec.field(default_factory=list)
    error: str = ""


class PluginHost:
    """Loads plugins once and answers which backends, auth providers, cache tiers and source
    schemes exist; the one place hooks are called (a small typed facade over pluggy)."""

    def __init__(self, *, allow: Iterable[str] | None = None) -> None:
        self._pm = pluggy.PluginManager(hookspecs.PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._records: dict[str, PluginRecord] = {}
        self._allow = set(allow) if allow is not None else _allow_from_env()
        self.backends: dict[str, type[Backend]] = {}
        self.auth_providers: dict[str, type[AuthProvider]] = {}
        self.cache_tiers: dict[str, type[CacheTier]] = {}
        self.source_schemes: dict[str, type[SourceScheme]] = {}
        self.api_extensions: dict[str, ApiExtension] = {}

    # -- loading -------------------------------------------------------------------------

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Import and register every entry point of ``group``; failures are recorded, not raised."""
        for ep in sorted(importlib.metadata.entry_points(group=group), key=lambda e: e.name):
            known = self._records.get(ep.name)
            if known is not None and known.status != "missing":
                continue
            dist = ep.dist.name if ep.dist is not None else ""
            version = ep.dist.version if ep.dist is not None else ""
            if self._allow is not None and ep.name not in self._allow:
                self._records[ep.name] = PluginRecord(
                    ep.name, dist, "skipped", version, error=f"not listed in {ALLOW_ENV}"
                )
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - a broken plugin must never be fatal
                self._fail(ep.name, dist, version, "import failed", exc)
                continue
            self.register(plugin, name=ep.name, source=dist, version=version)
        self._report_missing(group)
        self._check_pending()

    def _report_missing(self, group: str) -> None:
        """A name in the allow-list that no installed plugin has: a typo, or a package that
        is not installed. Say so, rather than serve without it in silence."""
        for name in sorted((self._allow or set()) - set(self._records)):
            error = (
                f"listed in {ALLOW_ENV} but no installed plugin is called {name!r} "
                f"(entry points of group {group!r})"
            )
            log.warning("plugin %r: %s", name, error)
            self._records[name] = PluginRecord(name, "", "missing", error=error)

    def register(
        self, plugin: ModuleType | object, *, name: str, source: str = "", version: str = ""
    ) -> bool:
        """Register one plugin object and collect what it provides; False if it was rejected."""
        try:
            self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._fail(name, source, version, "rejected", exc)
            return False
        record = PluginRecord(name, source or name, "loaded", version)
        self._records[name] = record
        try:
            self._collect(name, record)
        except PluginUnavailable as exc:
            self.unregister(name)
            log.info("plugin %r skipped: %s", name, exc)
            self._records[name] = PluginRecord(
                name, source or name, "skipped", version, error=str(exc)
            )
            return False
        except Exception as exc:  # noqa: BLE001
            self.unregister(name)
            self._fail(name, source, version, "registration hook failed", exc)
            return False
        return True

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        record = self._records.pop(name, None)
        if self._pm.has_plugin(name):
            self._pm.unregister(name=name)
        if record is not None:
            for key in record.backends:
                self.backends.pop(key, None)
            for key in record.auth_providers:
                self.auth_providers.pop(key, None)
            for key in record.cache_tiers:
                self.cache_tiers.pop(key, None)
            for key in record.source_schemes:
                self.source_schemes.pop(key, None)
            for key in record.api_extensions:
                self.api_extensions.pop(key, None)

    def _collect(self, name: str, record: PluginRecord) -> None:
        plugin = self._pm.get_plugin(name)
        self._call_one(plugin, "register_backends", Backend, self.backends, record.backends)
        self._call_one(
            plugin,
            "register_auth_providers",
            AuthProvider,
            self.auth_providers,
            record.auth_providers,
        )
        self._call_one(
            plugin, "register_cache_tiers", CacheTier, self.cache_tiers, record.cache_tiers
        )
        self._call_one(
            plugin,
            "register_source_schemes",
            SourceScheme,
            self.source_schemes,
            record.source_schemes,
        )
        self._collect_extensions(plugin, record)

    def _collect_extensions(self, plugin: object, record: PluginRecord) -> None:
        impl = getattr(plugin, "register_api_routes", None)
        if impl is None or not callable(impl):
            return
        found: dict[str, ApiExtension] = {}

        def register(extension: ApiExtension) -> None:
            if not isinstance(extension, ApiExtension):
                raise TypeError(f"register_api_routes: {extension!r} is not an ApiExtension")
            if extension.name in self.api_extensions or extension.name in found:
                raise ValueError(f"register_api_routes: /ext/{extension.name} registered twice")
            found[extension.name] = extension

        impl(register=register)
        self.api_extensions.update(found)
        record.api_extensions.extend(found)

    def _call_one(
        self,
        plugin: object,
        hook_name: str,
        base: type[_E],
        into: dict[str, type[_E]],
        names: list[str],
    ) -> None:
        impl = getattr(plugin, hook_name, None)
        if impl is None or not callable(impl):
            return
        found: dict[str, type[_E]] = {}

        def register(cls: type[_E]) -> None:
            if not (isinstance(cls, type) and issubclass(cls, base)) or not cls.name:
                raise TypeError(f"{hook_name}: {cls!r} is not a named {base.__name__} subclass")
            if cls.name in into or cls.name in found:
                raise ValueError(f"{hook_name}: {base.__name__} {cls.name!r} registered twice")
            found[cls.name] = cls

        impl(register=register)
        into.update(found)
        names.extend(found)

    def _check_pending(self) -> None:
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as exc:
            name = self._pm.get_name(exc.plugin) or str(exc.plugin)
            # Keep naming the distribution: ``modelyard plugins`` should say where it came from.
            known = self._records.get(name)
            source, version = (known.source, known.version) if known else (name, "")
            self.unregister(name)
            self._fail(name, source, version, "unknown hook", exc)
            self._check_pending()

    def _fail(self, name: str, source: str, version: str, what: str, exc: BaseException) -> None:
        text = f"{what}: {type(exc).__name__}: {exc}"
        log.warning("plugin %r skipped: %s", name, text)
        log.debug("plugin %r traceback:\n%s", name, "".join(traceback.format_exception(exc)))
        self._records[name] = PluginRecord(name, source or name, "failed", version, error=text)

    # -- queries -------------------------------------------------------------------------

    def unavailable(self) -> dict[str, str]:
        """Plugins that failed, were skipped or are missing, with why: a model that needed
        one of them names it in its error."""
        return {
            r.name: f"{r.status}: {r.error}" if r.error else r.status
            for r in self.records if r.status != "loaded"
        }

    @property
    def records(self) -> list[PluginRecord]:
        return sorted(self._records.values(), key=lambda r: r.name)

    # -- typed hook calls ----------------------------------------------------------------

    def open_response_cache(self, settings: CacheSettings, directory: Path) -> ResponseCache | None:
        """The response cache a plugin builds for ``settings``; None when no plugin can."""
        result: ResponseCache | None = self._pm.hook.open_response_cache(
            settings=settings, tiers=dict(self.cache_tiers), directory=directory
        )
        return result

    def open_cluster(self, settings: Settings) -> Cluster | None:
        """The cluster engine a plugin builds for ``settings.cluster``; None when none can."""
        result: Cluster | None = self._pm.hook.open_cluster(settings=settings)
        return result

    def server_startup(self, server: ServerContext) -> None:
        self._notify(self._pm.hook.server_startup, server=server)

    def server_shutdown(self, server: ServerContext) -> None:
        self._notify(self._pm.hook.server_shutdown, server=server)

    def model_version_state_changed(
        self, version: VersionView, old: VersionState | None, new: VersionState
    ) -> None:
        self._notify(self._pm.hook.model_version_state_changed, version=version, old=old, new=new)

    def _notify(self, caller: Callable[..., Any], **kwargs: Any) -> None:
        # An observer that raises must not break the server: report it and carry on.
        try:
            caller(**kwargs)
        except Exception:
            log.exception("a plugin's lifecycle hook raised")


def _allow_from_env() -> set[str] | None:
    raw = os.environ.get(ALLOW_ENV, "").strip()
    if not raw:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}
