"""The fake backends as a plugin, registered through the ``modelyard`` entry-point group."""

from __future__ import annotations

from collections.abc import Callable

from modelyard.core.backend import Backend
from modelyard.core.hookspecs import hookimpl
from modelyard.testing.backends import (
    CountingBackend,
    EchoBackend,
    FailingBackend,
    HangingBackend,
    SlowBackend,
)


@hookimpl
def register_backends(register: Callable[[type[Backend]], None]) -> None:
    for cls in (EchoBackend, SlowBackend, FailingBackend, HangingBackend, CountingBackend):
        register(cls)
