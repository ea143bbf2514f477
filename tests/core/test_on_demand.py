"""On-demand models: loaded by their first request within the memory budget, evicted least
recently used first (never under a request), unloaded after their keep-alive.

Every wait here is on an event: loads and answers are held by gates the tests open, the clock
is a FakeClock, and the keep-alive task and the load timeout sleep on an injected sleeper that
the tests wake.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from modelyard import hookimpl
from modelyard.core.auth import Principal
from modelyard.core.backend import Backend
from modelyard.core.errors import (
    ModelNotReadyError,
    ServiceUnavailableError,
    UnsupportedTaskError,
)
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import ModelVersion, VersionState
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    EmbeddingRequest,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Task,
)
from modelyard.testing import EchoBackend, EchoOptions, FakeClock

CHAT = ChatRequest((ChatMessage("user", "hello there"),))
LOAD_TIMEOUT_S = 999.0  # a figure no keep-alive round uses: the tests tell the sleeps apart


class SizedOptions(EchoOptions, forbid_unknown_fields=True, kw_only=True):
    #: What the loaded version reports holding.
    memory: int = 100


class SizedBackend(EchoBackend):
    """An echo that reports a fixed size; loads and answers wait at gates the test holds."""

    name = "sized"
    options_type = SizedOptions
    #: Every load, by model name, in order.
    loads: list[str] = []  # noqa: RUF012 - reset per test by the fixture
    #: Model name -> gate its loads wait at (absent: no wait).
    load_gates: dict[str, asyncio.Event] = {}  # noqa: RUF012
    #: Model name -> gate its answers wait at; ``entered`` is set when a call arrives.
    answer_gates: dict[str, asyncio.Event] = {}  # noqa: RUF012
    entered: dict[str, asyncio.Event] = {}  # noqa: RUF012
    #: Model name -> gate its unloads wait at; ``unloading`` is set when one starts.
    unload_gates: dict[str, asyncio.Event] = {}  # noqa: RUF012
    unloading: dict[str, asyncio.Event] = {}  # noqa: RUF012

    async def load(self) -> None:
        model = self.context.model
        SizedBackend.loads.append(model)
        gate = SizedBackend.load_gates.get(model)
        if gate is not None:
            await gate.wait()

    async def unload(self) -> None:
        model = self.context.model
        if model in SizedBackend.unloading:
            SizedBackend.unloading[model].set()
        gate = SizedBackend.unload_gates.get(model)
        if gate is not None:
            await gate.wait()

    def memory_bytes(self) -> int:
        return int(self.options.memory)

    @classmethod
    def detect_task(cls, path: Any, options: Any) -> Task | None:
        return Task.CHAT

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        model = self.context.model
        if model in SizedBackend.entered:
            SizedBackend.entered[model].set()
        gate = SizedBackend.answer_gates.get(model)
        if gate is not None:
            await gate.wait()
        return await super().infer(batch)


class _Plugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(SizedBackend)


class ManualSleeper:
    """The injected sleeper: a sleep lasts until the test wakes it (found by its length)."""

    def __init__(self) -> None:
        self.pending: list[tuple[float, asyncio.Future[None]]] = []
        self._changed = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        entry = (seconds, asyncio.get_running_loop().create_future())
        self.pending.append(entry)
        self._changed.set()
        try:
            await entry[1]
        finally:
            self.pending.remove(entry)

    async def sleeping(self, seconds: float) -> asyncio.Future[None]:
        """The pending sleep of ``seconds`` (waits, bounded, until there is one)."""
        async with asyncio.timeout(5):
            while True:
                for length, future in self.pending:
                    if length == seconds and not future.done():
                        return future
                self._changed.clear()
                await self._changed.wait()

    async def wake(self, seconds: float) -> None:
        (await self.sleeping(seconds)).set_result(None)


def model(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "sized", "source": ".", "task": "chat",
            "load": "on_demand", **extra}


Start = Callable[..., Any]


@pytest.fixture
async def start(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> AsyncIterator[Start]:
    """``await start(*model tables, **server settings)``: a started service, startup loads done."""
    plugin_host.register(_Plugin(), name="sized")
    SizedBackend.loads = []
    SizedBackend.load_gates, SizedBackend.answer_gates, SizedBackend.entered = {}, {}, {}
    SizedBackend.unload_gates, SizedBackend.unloading = {}, {}
    services: list[InferenceService] = []

    async def run(*models: dict[str, Any], sleeper: ManualSleeper | None = None,
                  aliases: list[dict[str, Any]] | None = None, **server: Any) -> InferenceService:
        settings = make_settings(
            models=list(models), server={"load_timeout_s": LOAD_TIMEOUT_S, **server},
            aliases=aliases or [],
        )
        service = InferenceService(
            settings, plugin_host, clock=fake_clock, sleep=sleeper or ManualSleeper()
        )
        services.append(service)
        await service.start()
        await service.wait_until_loaded()
        return service

    try:
        yield run
    finally:
        for service in services:
            await service.stop()
        plugin_host.unregister("sized")


def version(service: InferenceService, name: str) -> ModelVersion:
    return service.registry.entry(name).versions["1"]


def loaded(service: InferenceService) -> set[str]:
    return {e.name for e in service.registry for v in e.versions.values() if v.serving}


def sample(service: InferenceService, name: str, **labels: str) -> float:
    return service.telemetry.metrics.registry.get_sample_value(name, labels) or 0.0


async def answer(service: InferenceService, name: str) -> str:
    result = (await service.infer(name, CHAT)).result
    assert isinstance(result, GenerationResult)
    return result.text


# -- the scenario ------------------------------------------------------------------------


async def test_alternating_requests_with_room_for_one_model_are_all_answered(
    start: Start,
) -> None:
    service = await start(model("a"), model("b"), max_loaded_models=1)
    assert loaded(service) == set()  # nothing loads at start
    for name in ["a", "b", "a", "b", "a"]:
        assert await answer(service, name) == "hello there"
        assert loaded(service) == {name}
    assert SizedBackend.loads == ["a", "b", "a", "b", "a"]
    assert sample(service, "modelyard_model_loads_total", model="a", outcome="loaded") == 3
    assert sample(service, "modelyard_model_evictions_total", model="a", reason="budget") == 2
    assert sample(service, "modelyard_model_evictions_total", model="b", reason="budget") == 2
    assert sample(service, "modelyard_model_load_wait_seconds_count", model="b") == 2


async def test_a_model_with_a_request_in_flight_is_not_evicted(start: Start) -> None:
    service = await start(model("a"), model("b"), max_loaded_models=1)
    SizedBackend.answer_gates["a"] = gate = asyncio.Event()
    SizedBackend.entered["a"] = entered = asyncio.Event()
    held = asyncio.create_task(answer(service, "a"))
    await entered.wait()

    with pytest.raises(ServiceUnavailableError) as refused:
        await service.infer("b", CHAT)
    assert refused.value.status_code == 503
    assert refused.value.headers["Retry-After"] == "2"
    assert "no room to load model 'b'" in refused.value.detail
    assert "1 of 1 models are loaded (server.max_loaded_models)" in refused.value.detail
    assert loaded(service) == {"a"} and SizedBackend.loads == ["a"]
    assert sample(service, "modelyard_model_evictions_total", model="a", reason="budget") == 0

    gate.set()
    assert await held == "hello there"
    assert await answer(service, "b") == "hello there"  # a is idle now: evicted for b
    assert loaded(service) == {"b"}


async def test_an_open_stream_holds_its_model_until_it_is_closed(start: Start) -> None:
    service = await start(model("a"), model("b"), max_loaded_models=1)
    stream = await service.stream("a", CHAT)
    assert version(service, "a").in_flight == 1
    with pytest.raises(ServiceUnavailableError, match="no room"):
        await service.infer("b", CHAT)
    await stream.chunks.aclose()  # type: ignore[attr-defined]
    assert version(service, "a").in_flight == 0
    assert await answer(service, "b") == "hello there"


async def test_a_stream_read_to_its_end_lets_go_of_its_model(start: Start) -> None:
    service = await start(model("a"))
    stream = await service.stream("a", CHAT)
    texts = [chunk.text async for chunk in stream.chunks]
    assert "".join(texts) == "hello there"
    assert version(service, "a").in_flight == 0


async def test_a_request_of_another_task_is_refused_without_a_load(start: Start) -> None:
    service = await start(model("a"))
    with pytest.raises(UnsupportedTaskError, match="model 'a' serves chat, not embeddings"):
        await service.infer("a", EmbeddingRequest(("x",)))
    assert SizedBackend.loads == []


async def test_a_failed_request_lets_go_of_its_model(start: Start) -> None:
    service = await start(model("a"))
    await answer(service, "a")
    SizedBackend.answer_gates["a"] = gate = asyncio.Event()
    gate.set()
    with pytest.raises(UnsupportedTaskError):  # refused at the pick, the version held
        await service.infer("a", EmbeddingRequest(("x",)))
    with pytest.raises(ServiceUnavailableError):  # the cache is off: the breaker's refusal
        version(service, "a").breaker.force_open("test")
        await service.infer("a", CHAT)
    assert version(service, "a").in_flight == 0


async def test_concurrent_first_requests_share_one_load(start: Start) -> None:
    service = await start(model("a"))
    SizedBackend.load_gates["a"] = gate = asyncio.Event()
    requests = [asyncio.create_task(answer(service, "a")) for _ in range(10)]
    for _ in range(3):  # let every request reach the load it waits on
        await asyncio.sleep(0)
    assert version(service, "a").waiting == 10
    gate.set()
    assert await asyncio.gather(*requests) == ["hello there"] * 10
    assert SizedBackend.loads == ["a"]
    assert sample(service, "modelyard_model_loads_total", model="a", outcome="loaded") == 1
    assert version(service, "a").waiting == 0


async def test_a_loaded_model_is_not_evicted_before_its_waiting_requests_run(
    start: Start, fake_clock: FakeClock
) -> None:
    service = await start(
        model("a", options={"memory": 200}), model("b"), model("x"), memory_budget_bytes=250
    )
    for name in ["b", "x"]:
        await answer(service, name)
        fake_clock.advance(1)
    SizedBackend.unload_gates["b"] = unload_gate = asyncio.Event()
    SizedBackend.unloading["b"] = unloading = asyncio.Event()
    first = asyncio.create_task(answer(service, "a"))
    # a loaded (its 200 bytes known only now): b, least recently used, is being evicted.
    await unloading.wait()
    second = asyncio.create_task(service.infer("b", CHAT))
    for _ in range(3):  # b's load reaches the budget check, held by a's
        await asyncio.sleep(0)
    unload_gate.set()
    # a is loaded and idle when b's check runs, but a request waits on it: b has no room.
    assert await first == "hello there"
    with pytest.raises(ServiceUnavailableError, match="no room to load model 'b'"):
        await second
    assert loaded(service) == {"a"}


# -- the byte budget -----------------------------------------------------------------------------


async def test_the_byte_budget_evicts_the_least_recently_used_idle_model(
    start: Start, fake_clock: FakeClock
) -> None:
    service = await start(model("a"), model("b"), model("c"), memory_budget_bytes=250)
    for name in ["a", "b", "a"]:  # b is now the least recently used
        await answer(service, name)
        fake_clock.advance(1)
    assert loaded(service) == {"a", "b"}
    # c's size is unknown before its first load: it loads, then the budget is met again.
    await answer(service, "c")
    assert loaded(service) == {"a", "c"}
    assert sample(service, "modelyard_model_evictions_total", model="b", reason="budget") == 1
    memory = service.overview(Principal("test")).memory
    assert (memory.used_bytes, memory.budget_bytes, memory.loaded) == (200, 250, 2)

    # b's size is known now: room is made before it loads (a, least recently used, goes).
    fake_clock.advance(1)
    await answer(service, "c")
    await answer(service, "b")
    assert loaded(service) == {"b", "c"}


async def test_a_model_larger_than_the_whole_budget_is_refused(start: Start) -> None:
    service = await start(model("big", options={"memory": 1000}), memory_budget_bytes=500)
    with pytest.raises(ServiceUnavailableError) as first:
        await service.infer("big", CHAT)
    assert "needs 1000 bytes, more than the whole memory budget (500 bytes" in first.value.detail
    assert loaded(service) == set()  # loaded to learn its size, then let go
    with pytest.raises(ServiceUnavailableError, match="more than the whole memory budget"):
        await service.infer("big", CHAT)
    assert SizedBackend.loads == ["big"]  # its size is known: no second load


async def test_startup_models_count_against_the_budget_and_are_never_evicted(
    start: Start,
) -> None:
    service = await start(
        model("base", load="startup", options={"memory": 300}), model("a"),
        memory_budget_bytes=350,
    )
    assert loaded(service) == {"base"}
    with pytest.raises(ServiceUnavailableError) as refused:
        await service.infer("a", CHAT)  # 100 more would make 400
    assert "300 of 350 bytes are held and it needs 100" in refused.value.detail
    assert loaded(service) == {"base"}


async def test_a_pinned_on_demand_model_is_never_evicted(start: Start) -> None:
    service = await start(model("a", pinned=True), model("b"), max_loaded_models=1)
    await answer(service, "a")
    with pytest.raises(ServiceUnavailableError, match="serving requests or pinned"):
        await service.infer("b", CHAT)
    assert loaded(service) == {"a"}
    view = service.version_view("a", "1")
    assert (view.load, view.pinned, view.memory_bytes) == ("on_demand", True, 100)


# -- keep-alive, timeouts, failures ------------------------------------------------------------


async def test_an_idle_model_unloads_after_its_keep_alive(
    start: Start, fake_clock: FakeClock
) -> None:
    sleeper = ManualSleeper()
    service = await start(model("a", keep_alive_s=60), sleeper=sleeper)
    await sleeper.sleeping(60)  # nothing loaded: the task looks again a keep-alive later
    await answer(service, "a")  # last used now

    fake_clock.advance(30)
    await sleeper.wake(60)
    await sleeper.sleeping(30)  # looked, found it idle for 30 s: back when it is due
    assert loaded(service) == {"a"}

    fake_clock.advance(30)
    await sleeper.wake(30)
    await sleeper.sleeping(60)  # that round is over
    assert loaded(service) == set()
    assert version(service, "a").state == VersionState.UNLOADED
    assert sample(service, "modelyard_model_evictions_total", model="a", reason="idle") == 1
    assert await answer(service, "a") == "hello there"  # and it loads again when asked for


async def test_a_negative_keep_alive_or_a_pin_keeps_a_model_while_idle(
    start: Start, fake_clock: FakeClock
) -> None:
    sleeper = ManualSleeper()
    service = await start(
        model("a", keep_alive_s=-1), model("p", keep_alive_s=10, pinned=True),
        model("b", keep_alive_s=60), sleeper=sleeper,
    )
    for name in ["a", "p", "b"]:
        await answer(service, name)
    fake_clock.advance(3600)
    await sleeper.wake(60)
    await sleeper.sleeping(60)
    assert loaded(service) == {"a", "p"}


async def test_a_busy_model_outlives_its_keep_alive(start: Start, fake_clock: FakeClock) -> None:
    sleeper = ManualSleeper()
    service = await start(model("a", keep_alive_s=60), sleeper=sleeper)
    await answer(service, "a")
    SizedBackend.answer_gates["a"] = gate = asyncio.Event()
    SizedBackend.entered["a"] = entered = asyncio.Event()
    held = asyncio.create_task(answer(service, "a"))
    await entered.wait()
    fake_clock.advance(120)
    await sleeper.wake(60)
    await sleeper.sleeping(60)  # the round is over, and the busy model stays
    assert loaded(service) == {"a"}
    gate.set()
    await held  # idle from now: due a whole keep-alive later
    fake_clock.advance(59)
    await sleeper.wake(60)
    await sleeper.sleeping(1)
    assert loaded(service) == {"a"}
    fake_clock.advance(1)
    await sleeper.wake(1)
    await sleeper.sleeping(60)
    assert loaded(service) == set()


async def test_a_load_that_outlasts_the_timeout_gets_503_and_goes_on(start: Start) -> None:
    sleeper = ManualSleeper()
    service = await start(model("a"), sleeper=sleeper)
    SizedBackend.load_gates["a"] = gate = asyncio.Event()
    waiting = asyncio.create_task(service.infer("a", CHAT))
    await sleeper.wake(LOAD_TIMEOUT_S)
    with pytest.raises(ServiceUnavailableError) as timed_out:
        await waiting
    assert timed_out.value.detail == (
        "model 'a' version '1' is still loading after 999s (server.load_timeout_s); "
        "the load goes on, retry shortly"
    )
    assert timed_out.value.headers["Retry-After"] == "5"
    gate.set()
    assert await answer(service, "a") == "hello there"
    assert SizedBackend.loads == ["a"]  # the later request joined the same load


async def test_a_failed_load_is_not_retried_at_once(start: Start, fake_clock: FakeClock) -> None:
    service = await start(
        {"name": "f", "backend": "failing", "source": ".", "task": "chat",
         "load": "on_demand", "options": {"fail_on_load": True}},
    )
    for retry_after in ["5", "3"]:
        with pytest.raises(ModelNotReadyError) as failed:
            await service.infer("f", CHAT)
        assert failed.value.detail == (
            "model 'f' version '1' failed to load: failing backend refused to load"
        )
        assert failed.value.headers["Retry-After"] == retry_after  # when the next try is
        fake_clock.advance(2)
    assert sample(service, "modelyard_model_loads_total", model="f", outcome="failed") == 1
    fake_clock.advance(1)
    with pytest.raises(ServiceUnavailableError, match="refused to load"):
        await service.infer("f", CHAT)
    assert sample(service, "modelyard_model_loads_total", model="f", outcome="failed") == 2


# -- what the server says about on-demand models -----------------------------------------------


async def test_on_demand_models_are_listed_but_do_not_hold_up_readiness(start: Start) -> None:
    service = await start(model("a"), model("s", load="startup"))
    anyone = Principal("test")
    assert service.ready()
    assert [c.name for c in service.model_cards(anyone)] == ["a", "s"]
    rows = {r.name: (r.state, r.reason) for r in service.repository_index(anyone)}
    assert rows["a"] == ("UNAVAILABLE", "unloaded; loads on its first request (load = on_demand)")
    assert rows["s"] == ("READY", "")
    assert service.task_of("a") is not None  # from config: no load needed to build a request
    assert SizedBackend.loads == ["s"]

    await answer(service, "a")
    rows = {r.name: (r.state, r.reason) for r in service.repository_index(anyone)}
    assert rows["a"] == ("READY", "")
    overview = service.overview(anyone)
    views = {m.name: m.versions[0] for m in overview.models}
    assert (views["a"].load, views["a"].pinned, views["a"].memory_bytes) == ("on_demand", False,
                                                                             100)
    assert (views["s"].load, views["s"].pinned) == ("startup", True)
    assert overview.memory.used_bytes == 200 and overview.memory.loaded == 2
    assert overview.memory.budget_bytes is None and overview.memory.max_loaded is None


async def test_an_on_demand_model_without_a_task_needs_a_load_to_tell_it(start: Start) -> None:
    service = await start({**model("a"), "task": None})
    with pytest.raises(ServiceUnavailableError, match="set task in its config, or load it"):
        service.task_of("a")
    await service.load_model("a")  # the v2 repository load: within the budget too
    assert service.task_of("a") is not None


async def test_an_alias_loads_its_unloaded_on_demand_target(start: Start) -> None:
    service = await start(
        model("a"), model("b"), aliases=[{"name": "any", "targets": ["a", "b"]}],
        max_loaded_models=1,
    )
    assert (await service.infer("any", CHAT)).version.name == "a"  # loaded, not skipped
    stream = await service.stream("b", CHAT)  # b evicts a, and an open stream holds it
    # a cannot be loaded now (b is busy): the alias moves on to b.
    assert (await service.infer("any", CHAT)).version.name == "b"
    assert SizedBackend.loads == ["a", "b"] and loaded(service) == {"b"}
    await stream.chunks.aclose()  # type: ignore[attr-defined]


async def test_a_version_named_by_a_request_is_the_one_loaded(start: Start) -> None:
    service = await start(model("a"), {**model("a"), "version": "2"})
    result = await service.infer("a", CHAT, version="2")
    assert result.version.version == "2"
    assert version(service, "a").state == VersionState.UNLOADED
    assert service.registry.entry("a").active_version is None  # version 1 is meant to be
    await answer(service, "a")
    assert service.registry.entry("a").active_version == "1"
