"""The fake backends as a plugin; a server registers it only when its config names a fake."""

from __future__ import annotations

import sys
from collections.abc import Callable

from modelyard.core.backend import Backend
from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import Settings
from modelyard.testing.backends import (
    CountingBackend,
    EchoBackend,
    FailingBackend,
    HangingBackend,
    SlowBackend,
    StuckBackend,
)

__all__ = ["FAKE_BACKENDS", "PLUGIN_NAME", "add_named_fakes", "register_backends"]

FAKE_BACKENDS: tuple[type[Backend], ...] = (
    EchoBackend, SlowBackend, FailingBackend, HangingBackend, StuckBackend, CountingBackend,
)
#: The name the fakes register under in a PluginHost (``modelyard plugins`` shows it).
PLUGIN_NAME = "testing"


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    for cls in FAKE_BACKENDS:
        register(cls)


def add_named_fakes(host: PluginHost, settings: Settings) -> bool:
    """Register the fakes when a model in ``settings`` names one that nothing else provides.

    Configs such as ``examples/echo.toml`` keep working, while a server whose config names
    no fake does not list them among its installed backends. True when they were added.
    """
    fakes = {cls.name for cls in FAKE_BACKENDS}
    wanted = {m.backend for m in settings.models} - set(host.backends)
    if not wanted & fakes:
        return False
    return host.register(sys.modules[__name__], name=PLUGIN_NAME, source="modelyard.testing")
