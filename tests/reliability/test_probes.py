"""Probes: the built-in request per task, config overrides and checks, periodic health probes.

Periodic probes run on an injected clock and an injected sleeper, so these tests drive every
round themselves and never sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from modelyard import hookimpl
from modelyard.api.app import create_app
from modelyard.core.backend import Backend, BackendInfo
from modelyard.core.breaker import CircuitState
from modelyard.core.errors import ConfigError, QueueFullError, ServiceUnavailableError
from modelyard.core.plugins import PluginHost
from modelyard.core.probes import ProbeExpect, ProbeSettings, build_probe, check_answer
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, decode_settings
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Label,
    Task,
    TensorRequest,
    TensorSpec,
)
from modelyard.testing import EchoBackend, FakeClock

# -- the request -------------------------------------------------------------------------------

NO_INFO = BackendInfo()


def test_the_built_in_probe_is_one_short_request_of_the_task() -> None:
    chat = build_probe(Task.CHAT, ProbeSettings(), NO_INFO)
    assert isinstance(chat, ChatRequest) and len(chat.messages) == 1
    assert chat.messages[0].role == "user" and chat.params.max_tokens == 1
    completion = build_probe(Task.COMPLETION, ProbeSettings(), NO_INFO)
    assert isinstance(completion, CompletionRequest) and completion.params.max_tokens == 1
    assert build_probe(Task.EMBEDDINGS, ProbeSettings(), NO_INFO) == EmbeddingRequest(("Hi",))
    assert build_probe(Task.CLASSIFICATION, ProbeSettings(), NO_INFO) == ClassificationRequest(
        ("Hi",)
    )


def test_a_tensor_probe_is_zeros_of_each_described_input() -> None:
    info = BackendInfo(inputs=[
        TensorSpec("ids", "INT64", (-1, -1)),
        TensorSpec("pixels", "FP16", (-1, 3, 2)),
        TensorSpec("mask", "BOOL", (2,)),
        TensorSpec("text", "BYTES", (-1,)),
    ])
    probe = build_probe(Task.TENSOR, ProbeSettings(), info)
    assert isinstance(probe, TensorRequest)
    got = {t.name: (t.datatype, t.shape, t.data) for t in probe.inputs}
    assert got == {
        "ids": ("INT64", (1, 1), [0]),
        "pixels": ("FP16", (1, 3, 2), [0.0] * 6),
        "mask": ("BOOL", (2,), [False, False]),
        "text": ("BYTES", (1,), [b""]),
    }


def test_a_tensor_probe_needs_described_inputs_or_config() -> None:
    with pytest.raises(ValueError, match=r"set \[models.probe\] tensors"):
        build_probe(Task.TENSOR, ProbeSettings(), NO_INFO)


def _probe_settings(table: dict[str, Any]) -> ProbeSettings:
    settings = decode_settings(
        {"models": [{"name": "m", "backend": "echo", "source": ".", "probe": table}]}, env={}
    )
    return settings.models[0].probe


def test_config_overrides_the_request_per_task() -> None:
    probe = _probe_settings({
        "messages": [{"role": "system", "content": "be brief"}, {"content": "ping"}],
        "prompt": "Once", "inputs": ["a", "b"], "max_tokens": 2,
        "tensors": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}],
    })
    chat = build_probe(Task.CHAT, probe, NO_INFO)
    assert isinstance(chat, ChatRequest)
    assert [(m.role, m.content) for m in chat.messages] == [("system", "be brief"),
                                                            ("user", "ping")]
    assert chat.params.max_tokens == 2
    assert build_probe(Task.COMPLETION, probe, NO_INFO).prompt == "Once"  # type: ignore[union-attr]
    assert build_probe(Task.EMBEDDINGS, probe, NO_INFO) == EmbeddingRequest(("a", "b"))
    tensor = build_probe(Task.TENSOR, probe, NO_INFO)
    assert isinstance(tensor, TensorRequest) and tensor.inputs[0].shape == (1, 2)
    # Without messages, a chat probe says the prompt.
    only_prompt = build_probe(Task.CHAT, _probe_settings({"prompt": "Once"}), NO_INFO)
    assert only_prompt.messages[0].content == "Once"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("table", "path"),
    [
        ({"tensors": [{"name": "x", "datatype": "FLOAT", "shape": [1], "data": [0]}]},
         "$.models[0].probe.tensors[0]"),
        ({"tensors": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [0]}]},
         "$.models[0].probe.tensors[0]"),
        ({"expect": {"dimension": 8}}, "$.models[0].probe.expect"),
        ({"max_tokens": 0}, "$.models[0].probe.max_tokens"),
    ],
)
def test_a_bad_probe_table_is_a_config_error_naming_its_path(
    table: dict[str, Any], path: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _probe_settings(table)
    assert caught.value.detail.startswith(path), caught.value.detail


def test_expect_checks_the_answer() -> None:
    gen = GenerationResult("the answer is 4", "stop", 3, 4)
    chat = build_probe(Task.CHAT, ProbeSettings(), NO_INFO)
    assert check_answer(chat, gen, ProbeExpect(text_contains="4")) == ""
    assert "lacks '5'" in check_answer(chat, gen, ProbeExpect(text_contains="5"))
    emb = EmbeddingRequest(("a",))
    assert check_answer(emb, EmbeddingResult([[0.6, 0.8]], 1), ProbeExpect(dimensions=2)) == ""
    assert check_answer(emb, EmbeddingResult([[0.6, 0.8]], 1), ProbeExpect(dimensions=3)) == (
        "the vectors have 2 dimensions, expected 3"
    )
    assert check_answer(emb, EmbeddingResult([[float("nan")]], 1), ProbeExpect()) == (
        "the vectors hold NaN or infinite values"
    )
    assert check_answer(emb, EmbeddingResult([], 1), ProbeExpect()) == "1 texts got 0 vectors"
    cls = ClassificationRequest(("a",))
    result = ClassificationResult([[Label("positive", 0.9), Label("negative", 0.1)]])
    assert check_answer(cls, result, ProbeExpect(labels_include=["negative"])) == ""
    assert "['neutral']" in check_answer(cls, result, ProbeExpect(labels_include=["neutral"]))
    assert check_answer(chat, result, ProbeExpect()) == "a chat probe got ClassificationResult"


# -- periodic health probes --------------------------------------------------------------------


class DyingBackend(EchoBackend):
    """An echo until the test kills it; then every call fails."""

    name = "dying"
    dead = False
    busy = False

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        if DyingBackend.busy:  # turned away as a full engine would (llama.cpp's slots)
            raise QueueFullError("all slots busy")
        if DyingBackend.dead:
            self.calls.append(len(batch))
            raise RuntimeError("the accelerator fell off the bus")
        return await super().infer(batch)


class _Plugin:
    @staticmethod
    @hookimpl
    def register_backends(register: Callable[[type[Backend]], None]) -> None:
        register(DyingBackend)


class StepSleeper:
    """An injected sleeper: each sleep waits for the test, which moves the clock past it."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleeping: asyncio.Queue[tuple[float, asyncio.Event]] = asyncio.Queue()
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        wake = asyncio.Event()
        self.delays.append(seconds)
        await self.sleeping.put((seconds, wake))
        await wake.wait()

    async def round(self) -> None:
        """End the current sleep (the clock jumps by it) and wait until the prober sleeps again."""
        seconds, wake = await asyncio.wait_for(self.sleeping.get(), 5)
        self.clock.advance(seconds)
        wake.set()
        nxt = await asyncio.wait_for(self.sleeping.get(), 5)
        self.sleeping.put_nowait(nxt)


# Opens when both of the last two calls failed; the first probe (a success) is one of them.
BREAKER = {"window_size": 2, "minimum_calls": 2, "failure_rate_threshold": 100,
           "wait_in_open_ms": 30_000, "permitted_calls_in_half_open": 1}


@pytest.fixture
async def probed(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> AsyncIterator[Callable[..., Any]]:
    plugin_host.register(_Plugin(), name="dying")
    DyingBackend.dead = DyingBackend.busy = False
    services: list[InferenceService] = []

    async def start(server: dict[str, Any], **model: Any) -> tuple[InferenceService, StepSleeper]:
        sleeper = StepSleeper(fake_clock)
        table = {"name": "m", "backend": "dying", "source": ".", "task": "chat",
                 "breaker": BREAKER, **model}
        settings = make_settings(server=server, models=[table])
        service = InferenceService(settings, plugin_host, clock=fake_clock, sleep=sleeper)
        await service.start()
        services.append(service)
        await service.wait_until_loaded()
        return service, sleeper

    try:
        yield start
    finally:
        for service in services:
            await service.stop()
        plugin_host.unregister("dying")


async def _first_probe(service: InferenceService, sleeper: StepSleeper) -> None:
    version = service.registry.entry("m").versions["1"]
    for _ in range(5):  # loading may finish before or after the prober's first look
        if version.health is not None:
            return
        await sleeper.round()
    raise AssertionError("the version was never probed")


async def test_periodic_probes_notice_a_dead_version_without_user_traffic(
    probed: Callable[..., Any], fake_clock: FakeClock
) -> None:
    service, sleeper = await probed({"probe_interval_s": 10})
    version = service.registry.entry("m").versions["1"]
    await _first_probe(service, sleeper)
    assert version.health is not None and version.health.ok
    assert sleeper.delays[-1] == 10

    DyingBackend.dead = True
    await sleeper.round()
    assert version.health is not None and not version.health.ok and version.health.detail
    assert version.breaker.state == CircuitState.CLOSED  # one failure of a window of two
    await sleeper.round()
    assert version.breaker.state == CircuitState.OPEN

    # The first user request is refused at once: the probes already found it dead.
    backend = version.backend
    assert isinstance(backend, DyingBackend)
    calls = len(backend.calls)
    with pytest.raises(ServiceUnavailableError, match="circuit breaker"):
        await service.infer("m", ChatRequest((ChatMessage("user", "hi"),)))
    assert len(backend.calls) == calls

    # While open the version is left alone.
    await sleeper.round()
    assert len(backend.calls) == calls


async def test_a_probe_turned_away_by_a_busy_version_is_not_a_failure(
    probed: Callable[..., Any],
) -> None:
    service, sleeper = await probed({"probe_interval_s": 10})
    version = service.registry.entry("m").versions["1"]
    await _first_probe(service, sleeper)
    DyingBackend.busy = True
    for _ in range(3):  # three refusals: enough to open a breaker of window two
        await sleeper.round()
    assert version.breaker.state == CircuitState.CLOSED
    assert version.breaker.snapshot()["failed_calls"] == 0
    assert version.health is not None and version.health.ok  # the last real answer stands


async def test_half_open_probes_close_the_breaker_of_a_version_that_recovered(
    probed: Callable[..., Any], fake_clock: FakeClock
) -> None:
    service, sleeper = await probed({"probe_interval_s": 10})
    version = service.registry.entry("m").versions["1"]
    await _first_probe(service, sleeper)
    DyingBackend.dead = True
    for _ in range(2):
        await sleeper.round()
    assert version.breaker.state == CircuitState.OPEN
    DyingBackend.dead = False
    for _ in range(3):  # 30 s open, then half-open: the next probe is the deciding call
        await sleeper.round()
    assert version.breaker.state == CircuitState.CLOSED
    assert version.health is not None and version.health.ok


async def test_health_shows_in_admin_models(
    probed: Callable[..., Any], plugin_host: PluginHost
) -> None:
    service, sleeper = await probed({"probe_interval_s": 10})
    await _first_probe(service, sleeper)
    DyingBackend.dead = True
    await sleeper.round()
    app = create_app(service.settings, plugins=plugin_host, service=service)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://t") as client:
        view = (await client.get("/admin/models")).json()["models"][0]["versions"][0]
    health = view["health"]
    assert set(health) == {"ok", "checked_at", "detail"}
    assert health["ok"] is False and isinstance(health["checked_at"], float)
    assert health["detail"]
    assert view["breaker"]["failed_calls"] == 1


async def test_a_model_interval_overrides_the_server(probed: Callable[..., Any]) -> None:
    service, sleeper = await probed({"probe_interval_s": 10}, probe_interval_s=4)
    await _first_probe(service, sleeper)
    assert sleeper.delays[-1] == 4


async def test_periodic_probes_are_off_by_default(probed: Callable[..., Any]) -> None:
    service, sleeper = await probed({})
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "modelyard-health-probes"]
    assert sleeper.delays == []
    backend = service.registry.entry("m").versions["1"].backend
    assert backend.calls == []  # type: ignore[union-attr]
    # A model can turn them on for itself.
    _, sleeper = await probed({}, name="n", probe_interval_s=5)
    assert sleeper.delays == [5]


async def test_stop_ends_the_probes_cleanly(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> None:
    sleeper = StepSleeper(fake_clock)
    settings = make_settings(server={"probe_interval_s": 10}, models=[
        {"name": "m", "backend": "echo", "source": ".", "task": "chat"}
    ])
    service = InferenceService(settings, plugin_host, clock=fake_clock, sleep=sleeper)
    await service.start()
    await service.wait_until_loaded()
    probes = [t for t in asyncio.all_tasks() if t.get_name() == "modelyard-health-probes"]
    assert len(probes) == 1
    await service.stop()
    assert probes[0].done() and probes[0].cancelled()


async def test_a_canary_whose_probes_open_its_breaker_is_rolled_back(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], fake_clock: FakeClock
) -> None:
    plugin_host.register(_Plugin(), name="dying")
    DyingBackend.dead = DyingBackend.busy = False
    sleeper = StepSleeper(fake_clock)
    settings = make_settings(server={"probe_interval_s": 10}, models=[
        {"name": "m", "backend": "echo", "source": ".", "task": "chat", "breaker": BREAKER},
        {"name": "m", "version": "2", "backend": "dying", "source": ".", "task": "chat",
         "breaker": BREAKER},
    ])
    service = InferenceService(settings, plugin_host, clock=fake_clock, sleep=sleeper)
    try:
        await service.start()
        await service.wait_until_loaded()
        service.start_canary("m", "2", 10)
        canary = service.registry.entry("m").versions["2"]
        for _ in range(5):
            if canary.health is not None:
                break
            await sleeper.round()
        DyingBackend.dead = True
        for _ in range(2):
            await sleeper.round()
        assert canary.breaker.state == CircuitState.OPEN
        model = service.model_views()[0]
        assert model.canary is None and model.traffic == {"1": 100.0}
        assert model.last_canary_rollback == "the canary's circuit breaker opened"
    finally:
        await service.stop()
        plugin_host.unregister("dying")
