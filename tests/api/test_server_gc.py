"""``modelyard serve`` tunes the collector before it starts serving."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from modelyard.api.server import tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_startup_objects_are_frozen_and_young_collections_batched(restored_gc: None) -> None:
    tune_gc()
    assert gc.get_freeze_count() > 1000  # everything imported so far is out of the collector's view
    assert gc.get_threshold()[0] == 10_000
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1  # cycles made after startup are still collected
