"""Security fixtures: a key store on a fake wall clock, and keys for each role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from modelyard.plugins.apikeys import ApiKeyOptions, ApiKeyProvider
from modelyard.testing import FakeClock


@dataclass
class Clocks:
    monotonic: FakeClock
    wall: FakeClock


@pytest.fixture
def clocks() -> Clocks:
    return Clocks(FakeClock(start=1000.0), FakeClock(start=1_800_000_000.0))


@pytest.fixture
def key_provider(tmp_path: Path, clocks: Clocks) -> ApiKeyProvider:
    options = ApiKeyOptions(database=str(tmp_path / "keys.sqlite3"))
    return ApiKeyProvider(options, clock=clocks.wall)


@pytest.fixture
def keys(key_provider: ApiKeyProvider) -> dict[str, str]:
    """One key per role (every model), plus ``scoped`` (user, only ``echo``)."""
    store = key_provider.store
    made = {role: store.create(name=role, roles=[role]).key
            for role in ("admin", "operator", "user", "viewer")}
    made["scoped"] = store.create(name="scoped", roles=["user"], models=["echo"]).key
    return made
