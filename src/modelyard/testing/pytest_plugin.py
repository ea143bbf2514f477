"""Pytest fixtures for modelyard and for third-party plugin authors (auto-loaded via pytest11)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from modelyard.core.plugins import PluginHost
from modelyard.core.settings import Settings, decode_settings
from modelyard.testing import plugin as fake_plugin
from modelyard.testing.clock import FakeClock


@pytest.fixture
def fake_clock() -> FakeClock:
    """A clock that moves only when the test calls ``advance``."""
    return FakeClock()


@pytest.fixture
def plugin_host() -> Iterator[PluginHost]:
    """A PluginHost with only the fake backends registered (no entry points scanned)."""
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing", source="modelyard.testing")
    try:
        yield host
    finally:
        host.unregister("testing")


@pytest.fixture
def make_settings() -> Callable[..., Settings]:
    """Build Settings from keyword tables: ``make_settings(models=[{...}], server={...})``."""

    def build(**tables: Any) -> Settings:
        return decode_settings(tables, env={})

    return build
