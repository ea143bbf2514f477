"""Backend plugin (work in progress)."""

from __future__ import annotations

from collections.abc import Callable

from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginUnavailable


@hookimpl
def register_backends(register: Callable[[type], None]) -> None:
    raise PluginUnavailable("not implemented yet")
