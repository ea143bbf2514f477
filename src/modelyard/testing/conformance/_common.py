"""What every conformance class shares: the failure type, entry-point lookup, running async."""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import msgspec

from modelyard.core.backend import Backend
from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import ENTRY_POINT_GROUP, PluginHost, PluginRecord

__all__ = [
    "BackendPlugin",
    "ConformanceError",
    "check_options_type",
    "find_entry_point",
    "host_for_entry_point",
    "provided_by",
    "run_async",
]

_T = TypeVar("_T")

#: A field no options Struct declares; converting it must fail.
UNKNOWN_FIELD = "no_such_option_conformance"


class ConformanceError(AssertionError):
    """A plugin broke its contract; the message says what is wrong in plain words."""


def run_async(awaitable: Awaitable[_T], *, timeout_s: float, what: str) -> _T:
    """Run ``awaitable`` in a fresh event loop, failing when it takes longer than ``timeout_s``.

    Each check gets its own loop, so the kit works whatever asyncio mode the author's pytest
    runs in.
    """

    async def bounded() -> _T:
        try:
            return await asyncio.wait_for(awaitable, timeout=timeout_s)
        except TimeoutError:
            raise ConformanceError(f"{what} did not finish within {timeout_s:g} s") from None

    return asyncio.run(bounded())


def find_entry_point(name: str, group: str = ENTRY_POINT_GROUP) -> importlib.metadata.EntryPoint:
    """The installed entry point ``name`` of ``group``, exactly as the server finds it."""
    found = importlib.metadata.entry_points(group=group)
    for ep in found:
        if ep.name == name:
            return ep
    known = ", ".join(sorted({ep.name for ep in found})) or "none"
    raise ConformanceError(
        f"entry point {name!r} not found in group {group!r} (installed: {known}); declare it "
        f"under [project.entry-points.{group}] in pyproject.toml and install the package"
    )


def host_for_entry_point(name: str) -> PluginHost:
    """A PluginHost holding only the plugin that entry point ``name`` loads."""
    ep = find_entry_point(name)
    try:
        plugin = ep.load()
    except Exception as exc:  # noqa: BLE001 - any import error is the finding
        raise ConformanceError(
            f"entry point {name!r} ({ep.value}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    host = PluginHost(allow=())
    dist = ep.dist.name if ep.dist is not None else name
    if not host.register(plugin, name=name, source=dist):
        record = _record(host, name)
        why = record.error if record is not None else "rejected"
        raise ConformanceError(f"plugin {name!r} did not register: {why}")
    return host


def _record(host: PluginHost, name: str) -> PluginRecord | None:
    return next((r for r in host.records if r.name == name), None)


def provided_by(host: PluginHost, name: str, kind: str) -> list[str]:
    """Names of the ``kind`` (``backends``, ``cache_tiers``, ...) plugin ``name`` registered."""
    record = _record(host, name)
    return [] if record is None else list(getattr(record, kind))


class BackendPlugin:
    """A plugin object registering one Backend class (for a class the kit is given directly)."""

    def __init__(self, cls: type[Backend]) -> None:
        self._cls = cls

    @hookimpl
    def register_backends(self, register: Callable[[type[Backend]], None]) -> None:
        register(self._cls)


def check_options_type(
    owner: str, options_type: type[msgspec.Struct], options: Mapping[str, Any]
) -> Any:
    """Convert ``options``; a field the Struct does not declare must be refused."""
    try:
        converted = msgspec.convert(dict(options), options_type)
    except msgspec.ValidationError as exc:
        raise ConformanceError(
            f"{owner}: the configured options do not validate against "
            f"{options_type.__name__}: {exc}"
        ) from None
    try:
        msgspec.convert({**options, UNKNOWN_FIELD: 1}, options_type)
    except msgspec.ValidationError:
        return converted
    raise ConformanceError(
        f"{owner}: options_type {options_type.__name__} accepts the unknown field "
        f"{UNKNOWN_FIELD!r}, so a typo in a config file would pass silently; declare it with "
        "msgspec.Struct(forbid_unknown_fields=True)"
    )
