"""The event bus and what the core publishes on it: states, progress, swaps, canaries, breakers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from modelyard.core.breaker import BreakerSettings, CircuitBreaker
from modelyard.core.events import (
    EVENT_KINDS,
    BatchProgress,
    BreakerChanged,
    CanaryChanged,
    Event,
    EventBus,
    LoadProgress,
    ModelRolledBack,
    ModelSwapped,
    VersionStateChanged,
)
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import FakeClock


def _progress(version: str = "1", model: str = "m") -> LoadProgress:
    return LoadProgress(model=model, version=version, percent=0.0, phase="x")


async def test_events_are_stamped_in_order_and_encode_with_their_kind() -> None:
    bus = EventBus(clock=lambda: 42.0)
    sub = bus.subscribe()
    bus.publish(_progress("1"))
    bus.publish(BatchProgress(batch_id="b", owner="k", status="in_progress", completed=1,
                              failed=0, total=2))
    first, second = await sub.next(), await sub.next()
    assert first is not None and second is not None
    assert (first.seq, second.seq) == (1, 2) and first.at == 42.0
    wire = msgspec.json.decode(msgspec.json.encode(second))
    assert wire["kind"] == "batch.progress" and wire["owner"] == "k"
    assert msgspec.json.decode(msgspec.json.encode(first), type=Event) == first
    assert {"version.state", "load.progress", "model.swap", "model.rollback", "canary",
            "breaker.state", "batch.progress", "batch.completed"} == EVENT_KINDS


async def test_a_slow_subscriber_is_dropped_and_the_others_keep_everything() -> None:
    bus = EventBus(buffer=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    received: list[int] = []
    for i in range(10):
        bus.publish(_progress(str(i)))  # never blocks, whoever reads
        event = await fast.next()
        assert event is not None
        received.append(event.seq)
    assert received == list(range(1, 11))
    assert slow.dropped and slow.closed and await slow.next() is None
    assert bus.subscribers == 1


async def test_a_filter_chooses_what_a_subscriber_gets() -> None:
    bus = EventBus()
    sub = bus.subscribe(lambda e: e.model == "b")
    bus.publish(_progress(model="a"))
    bus.publish(_progress(model="b"))
    sub.close()
    bus.publish(_progress(model="b"))  # after the close: not delivered
    assert [e.model async for e in sub] == ["b"]  # what was buffered, then the end


async def test_publishing_from_another_thread_reaches_the_loop() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    thread = threading.Thread(target=lambda: bus.publish(_progress("t")))
    thread.start()
    thread.join()
    event = await asyncio.wait_for(sub.next(), 5)
    assert isinstance(event, LoadProgress) and event.version == "t"


async def test_closing_the_bus_ends_subscriptions_without_dropping_them() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    waiter = asyncio.get_running_loop().create_task(sub.wait_closed())
    bus.close()
    await asyncio.wait_for(waiter, 5)
    assert sub.closed and not sub.dropped


def test_a_breaker_reports_its_transitions(fake_clock: FakeClock) -> None:
    seen: list[tuple[str, str]] = []
    breaker = CircuitBreaker("b", BreakerSettings(), clock=fake_clock,
                             on_transition=lambda _b, old, new: seen.append((old, new)))
    breaker.force_open("stuck")
    assert seen == [("closed", "open")]


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(models=[
        {"name": "m", "backend": "echo", "source": str(tmp_path), "task": "chat"},
        {"name": "m", "backend": "echo", "source": str(tmp_path), "task": "chat",
         "version": "2", "active": False},
    ])


async def test_the_service_publishes_loads_swaps_rollbacks_canaries_and_breakers(
    settings: Settings, plugin_host: PluginHost
) -> None:
    service = InferenceService(settings, plugin_host)
    sub = service.events.subscribe()
    await service.start()
    try:
        await service.wait_until_loaded()
        await service.swap("m", "2")
        await service.rollback("m")
        service.start_canary("m", "2", 10.0)
        service.stop_canary("m")
        service.registry.entry("m").versions["2"].breaker.force_open("stuck")
    finally:
        await service.stop()
    events = [e async for e in sub]  # the service's stop closed the bus
    kinds = [type(e) for e in events]
    assert kinds.index(LoadProgress) < kinds.index(ModelSwapped) < kinds.index(ModelRolledBack)
    states = [(e.version, e.new) for e in events if isinstance(e, VersionStateChanged)]
    assert states[:4] == [("1", "loading"), ("2", "loading"), ("1", "ready"), ("1", "active")]
    swap = next(e for e in events if isinstance(e, ModelSwapped))
    assert (swap.from_version, swap.to_version) == ("1", "2")
    back = next(e for e in events if isinstance(e, ModelRolledBack))
    assert (back.from_version, back.to_version) == ("2", "1")
    canary = [(e.action, e.version, e.percent) for e in events if isinstance(e, CanaryChanged)]
    assert canary == [("started", "2", 10.0), ("stopped", "2", 10.0)]
    breaker = [(e.version, e.old, e.new) for e in events if isinstance(e, BreakerChanged)]
    assert ("2", "closed", "open") in breaker
    assert [e.seq for e in events] == sorted(e.seq for e in events)
