"""CacheLayer: read-through, promotion, coalescing, keys per version and tenant, purge, streams."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.cache.codec import ResultCodec
from modelyard.cache.disk import DiskOptions, DiskTier
from modelyard.cache.keys import derive_secrets
from modelyard.cache.layer import CacheLayer, PurgeGenerations, replay_stream
from modelyard.cache.memory import MemoryOptions, MemoryTier
from modelyard.core.backend import LoadContext
from modelyard.core.cache_tier import CacheTier
from modelyard.core.errors import BackendError
from modelyard.core.types import (
    ClassificationResult,
    CompletionRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Label,
    StreamChunk,
    Task,
    Tensor,
    TensorResult,
)
from modelyard.testing import EchoBackend, EchoOptions, FakeClock

GREEDY = GenerationParams(temperature=0.0, max_tokens=16)
SECRET = "layer test secret"


def _echo() -> EchoBackend:
    context = LoadContext(
        model="echo", version="1", task=Task.COMPLETION, source="", path=None, options=EchoOptions()
    )
    return EchoBackend(context)


def _key(layer: CacheLayer, request: InferenceRequest, **overrides: str) -> bytes:
    fields = {"model": "echo", "version": "1", "weights_digest": "w1", "backend": "echo",
                  "backend_version": "0.1", "tenant": "acme"}
    fields.update(overrides)
    key = layer.key_for(request, **fields)
    assert key is not None
    return key


class Counter:
    """An EchoBackend behind a ``run`` callable, counting backend calls."""

    def __init__(self, request: InferenceRequest, backend: EchoBackend | None = None) -> None:
        self.backend = backend or _echo()
        self.request = request
        self.gate = asyncio.Event()
        self.gate.set()

    @property
    def calls(self) -> int:
        return len(self.backend.calls)

    async def run(self) -> InferenceResult:
        self.backend.calls.append(1)
        await self.gate.wait()
        result = self.backend._answer(self.request)
        return result


def memory_layer(clock: FakeClock | None = None, **options: Any) -> CacheLayer:
    tier = MemoryTier(MemoryOptions(**options), **({"clock": clock} if clock else {}))
    return CacheLayer([tier], secret=SECRET)


# -- read-through ---------------------------------------------------------------------------


async def test_miss_runs_and_stores_then_hit_does_not_run() -> None:
    layer = memory_layer()
    request = CompletionRequest("hello cache world", GREEDY)
    counter = Counter(request)
    key = _key(layer, request)
    first, outcome = await layer.lookup_or_run(key, counter.run)
    assert outcome == "miss"
    await layer.settle()
    second, outcome = await layer.lookup_or_run(key, counter.run)
    assert outcome == "hit"
    assert second == first
    assert counter.calls == 1
    assert layer.stats()["hits"] == 1 and layer.stats()["misses"] == 1


async def test_a_hit_in_a_lower_tier_is_promoted(tmp_path: Path) -> None:
    disk_options = DiskOptions(directory=str(tmp_path / "disk"))
    memory, disk = MemoryTier(MemoryOptions()), DiskTier(disk_options)
    layer = CacheLayer([memory, disk], secret=SECRET)
    request = CompletionRequest("promote me", GREEDY)
    counter = Counter(request)
    key = _key(layer, request)
    await layer.lookup_or_run(key, counter.run)
    await layer.close()  # lets the store that follows a miss finish
    # A restart: memory is empty, disk still has the entry.
    memory = MemoryTier(MemoryOptions())
    layer = CacheLayer([memory, DiskTier(disk_options)], secret=SECRET)
    assert await memory.get(key) is None
    _result, outcome = await layer.lookup_or_run(key, counter.run)
    assert outcome == "hit" and counter.calls == 1
    assert await memory.get(key) is not None
    assert [t["hits"] for t in layer.stats()["tiers"]] == [0, 1]
    await layer.lookup_or_run(key, counter.run)
    assert [t["hits"] for t in layer.stats()["tiers"]] == [1, 1]
    await layer.close()


async def test_ttl_runs_on_the_injected_clock(fake_clock: FakeClock) -> None:
    layer = memory_layer(fake_clock, ttl_s=30)
    request = CompletionRequest("short lived", GREEDY)
    counter = Counter(request)
    key = _key(layer, request)
    await layer.lookup_or_run(key, counter.run)
    fake_clock.advance(29)
    assert (await layer.lookup_or_run(key, counter.run))[1] == "hit"
    fake_clock.advance(1)
    assert (await layer.lookup_or_run(key, counter.run))[1] == "miss"
    assert counter.calls == 2


class BrokenTier(CacheTier):
    name = "broken"

    async def get(self, key: bytes) -> bytes | None:
        raise ConnectionError("redis is down")

    async def set(self, key: bytes, value: bytes) -> None:
        raise ConnectionError("redis is down")

    async def delete(self, key: bytes) -> None:
        raise ConnectionError("redis is down")

    async def clear(self) -> None:
        raise ConnectionError("redis is down")


async def test_a_failing_tier_is_a_miss_never_a_failed_request() -> None:
    memory = MemoryTier(MemoryOptions())
    layer = CacheLayer([BrokenTier(None), memory], secret=SECRET)
    request = CompletionRequest("still served", GREEDY)
    counter = Counter(request)
    key = _key(layer, request)
    assert (await layer.lookup_or_run(key, counter.run))[1] == "miss"
    assert (await layer.lookup_or_run(key, counter.run))[1] == "hit"
    await layer.purge(None)
    assert layer.stats()["tier_errors"] >= 3


async def test_a_forged_or_corrupt_value_is_a_miss_and_is_removed() -> None:
    memory = MemoryTier(MemoryOptions())
    layer = CacheLayer([memory], secret=SECRET)
    request = CompletionRequest("tamper", GREEDY)
    counter = Counter(request)
    key = _key(layer, request)
    # A value MAC'd with another secret: well formed, but not ours.
    forged = ResultCodec(derive_secrets("attacker")[1]).encode(
        GenerationResult("pwned", "stop", 1, 1)
    )
    for bad in (forged, b"", b"\x01" + bytes(40), b"\x02garbage"):
        await memory.set(key, bad)
        result, outcome = await layer.lookup_or_run(key, counter.run)
        assert outcome == "miss"
        assert isinstance(result, GenerationResult) and result.text != "pwned"
        await memory.set(key, bad)
        assert await layer.lookup(key) is None
        assert await memory.get(key) is None
    assert layer.stats()["corrupt"] == 8


# -- coalescing -----------------------------------------------------------------------------


async def test_twenty_identical_concurrent_requests_make_one_backend_call() -> None:
    layer = memory_layer()
    request = CompletionRequest("many callers one answer", GREEDY)
    counter = Counter(request)
    counter.gate.clear()
    key = _key(layer, request)
    waiting = asyncio.gather(*(layer.lookup_or_run(key, counter.run) for _ in range(20)))
    release = asyncio.get_running_loop().call_soon(counter.gate.set)
    answers = await waiting
    release.cancel()
    assert counter.calls == 1
    assert len({id(result) for result, _ in answers}) == 1
    assert sorted(outcome for _, outcome in answers) == ["hit"] * 19 + ["miss"]
    assert layer.stats()["coalesced"] == 19


async def test_every_coalesced_request_gets_the_error_and_nothing_is_cached() -> None:
    layer = memory_layer()
    calls = 0

    async def failing() -> InferenceResult:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        raise BackendError("backend exploded")

    key = _key(layer, CompletionRequest("boom", GREEDY))
    answers = await asyncio.gather(
        *(layer.lookup_or_run(key, failing) for _ in range(20)), return_exceptions=True
    )
    assert calls == 1
    assert all(isinstance(a, BackendError) for a in answers)
    with pytest.raises(BackendError):
        await layer.lookup_or_run(key, failing)
    assert calls == 2


async def test_a_cancelled_leader_does_not_cancel_its_followers() -> None:
    layer = memory_layer()
    request = CompletionRequest("leader leaves", GREEDY)
    counter = Counter(request)
    counter.gate.clear()
    key = _key(layer, request)
    leader = asyncio.create_task(layer.lookup_or_run(key, counter.run))
    await asyncio.sleep(0)
    follower = asyncio.create_task(layer.lookup_or_run(key, counter.run))
    await asyncio.sleep(0)
    leader.cancel()
    counter.gate.set()
    result, _ = await follower
    assert isinstance(result, GenerationResult)
    assert leader.cancelled()
    # And the answer was stored although its leader was gone.
    assert (await layer.lookup_or_run(key, counter.run))[1] == "hit"
    assert counter.calls == 1


async def test_close_cancels_lookups_still_waiting_on_a_backend() -> None:
    layer = memory_layer()
    request = CompletionRequest("never answered", GREEDY)
    counter = Counter(request)
    counter.gate.clear()
    waiter = asyncio.create_task(layer.lookup_or_run(_key(layer, request), counter.run))
    await asyncio.sleep(0)
    await layer.close()
    with pytest.raises(asyncio.CancelledError):
        await waiter


# -- what goes into a key -------------------------------------------------------------------


async def test_non_deterministic_requests_are_not_cached() -> None:
    layer = memory_layer()
    sampled = CompletionRequest("creative", GenerationParams(temperature=0.9))
    assert layer.key_for(
        sampled, model="echo", version="1", weights_digest="w", backend="echo",
        backend_version="1", tenant="",
    ) is None
    seeded = CompletionRequest("creative", GenerationParams(temperature=0.9, seed=42))
    assert _key(layer, seeded) is not None


async def test_two_tenants_never_share_an_entry() -> None:
    layer = memory_layer()
    request = CompletionRequest("same words, different companies", GREEDY)
    counter = Counter(request)
    acme, globex = _key(layer, request, tenant="acme"), _key(layer, request, tenant="globex")
    assert acme != globex
    assert (await layer.lookup_or_run(acme, counter.run))[1] == "miss"
    assert (await layer.lookup_or_run(globex, counter.run))[1] == "miss"
    assert counter.calls == 2


async def test_a_swap_or_rollback_never_serves_the_other_versions_entry() -> None:
    layer = memory_layer()
    request = CompletionRequest("versioned", GREEDY)
    v1 = _key(layer, request, version="1", weights_digest="w1")
    v2 = _key(layer, request, version="2", weights_digest="w2")
    await layer.store(v1, GenerationResult("from v1", "stop", 1, 2))
    assert await layer.lookup(v2) is None  # swapped to v2: v1's answer is not served
    await layer.store(v2, GenerationResult("from v2", "stop", 1, 2))
    hit = await layer.lookup(v1)  # rolled back to v1: its own answer, not v2's
    assert isinstance(hit, GenerationResult) and hit.text == "from v1"
    # Same label, new weights in place: a new key as well.
    assert _key(layer, request, version="1", weights_digest="w1-retrained") != v1


async def test_the_secret_separates_servers() -> None:
    tier = MemoryTier(MemoryOptions())
    ours, theirs = CacheLayer([tier], secret="ours"), CacheLayer([tier], secret="theirs")
    request = CompletionRequest("who are you", GREEDY)
    assert _key(ours, request) != _key(theirs, request)


# -- purge ----------------------------------------------------------------------------------


async def test_purging_a_model_orphans_its_entries_only_and_survives_a_restart(
    tmp_path: Path,
) -> None:
    memory = MemoryTier(MemoryOptions())
    layer = CacheLayer([memory], secret=SECRET, generations=PurgeGenerations(tmp_path))
    request = CompletionRequest("purge me", GREEDY)
    echo_key, other_key = _key(layer, request), _key(layer, request, model="other")
    await layer.store(echo_key, GenerationResult("echo", "stop", 1, 1))
    await layer.store(other_key, GenerationResult("other", "stop", 1, 1))
    await layer.purge("echo")
    assert _key(layer, request) != echo_key
    assert await layer.lookup(_key(layer, request)) is None
    assert await layer.lookup(_key(layer, request, model="other")) is not None
    # A new process with the same directory agrees on what was purged.
    again = CacheLayer([memory], secret=SECRET, generations=PurgeGenerations(tmp_path))
    assert await again.lookup(_key(again, request)) is None
    assert await again.lookup(_key(again, request, model="other")) is not None
    assert (tmp_path / "generations.json").stat().st_mode & 0o077 == 0


async def test_purging_everything_clears_the_tiers() -> None:
    memory = MemoryTier(MemoryOptions())
    layer = CacheLayer([memory], secret=SECRET)
    request = CompletionRequest("all gone", GREEDY)
    key = _key(layer, request)
    await layer.store(key, GenerationResult("x", "stop", 1, 1))
    await layer.purge(None)
    assert memory.stats()["entries"] == 0
    assert _key(layer, request) != key


async def test_an_unreadable_generations_file_purges_everything(tmp_path: Path) -> None:
    (tmp_path / "generations.json").write_text("{not json")
    layer = CacheLayer([MemoryTier(MemoryOptions())], secret=SECRET,
                       generations=PurgeGenerations(tmp_path))
    fresh = CacheLayer([MemoryTier(MemoryOptions())], secret=SECRET)
    request = CompletionRequest("x", GREEDY)
    assert _key(layer, request) != _key(fresh, request)


# -- refresh and streams --------------------------------------------------------------------


async def test_refresh_skips_the_read_and_stores_the_fresh_answer() -> None:
    layer = memory_layer()
    request = CompletionRequest("no-cache please", GREEDY)
    key = _key(layer, request)
    await layer.store(key, GenerationResult("stale", "stop", 1, 1))
    fresh, outcome = await layer.lookup_or_run(key, Counter(request).run, refresh=True)
    assert outcome == "miss" and isinstance(fresh, GenerationResult) and fresh.text != "stale"
    assert await layer.lookup(key) == fresh


async def _drain(chunks: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [chunk async for chunk in chunks]


async def test_a_stream_is_stored_as_its_result_and_replayed_as_a_stream() -> None:
    layer = memory_layer()
    backend = _echo()
    request = CompletionRequest("stream these words please", GREEDY)
    key = _key(layer, request)
    starts = 0

    async def start() -> AsyncIterator[StreamChunk]:
        nonlocal starts
        starts += 1
        return backend.stream(request)

    chunks, outcome = await layer.stream_through(key, start)
    live = await _drain(chunks)
    assert outcome == "miss"
    replayed_iter, outcome = await layer.stream_through(key, start)
    replayed = await _drain(replayed_iter)
    assert outcome == "hit" and starts == 1
    assert "".join(c.text for c in replayed) == "".join(c.text for c in live)
    assert len(replayed) > 2
    assert replayed[-1].finish_reason == live[-1].finish_reason
    assert replayed[-1].completion_tokens == live[-1].completion_tokens
    # The non-streamed request shares the entry.
    result, outcome = await layer.lookup_or_run(key, Counter(request).run)
    assert outcome == "hit" and isinstance(result, GenerationResult)
    assert result.text == "stream these words please"


async def test_an_abandoned_stream_is_not_stored() -> None:
    layer = memory_layer()
    backend = _echo()
    request = CompletionRequest("the client hangs up early", GREEDY)
    key = _key(layer, request)

    async def start() -> AsyncIterator[StreamChunk]:
        return backend.stream(request)

    chunks, _ = await layer.stream_through(key, start)
    first = await anext(chunks)
    assert first.text
    await chunks.aclose()  # type: ignore[attr-defined]
    assert await layer.lookup(key) is None


async def test_replay_stream_keeps_text_and_usage() -> None:
    result = GenerationResult("  Hello,  world!\n\nBye ", "length", 5, 4)
    chunks = await _drain(replay_stream(result))
    assert "".join(c.text for c in chunks) == result.text
    assert chunks[-1] == StreamChunk("", "length", 5, 4)
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert await _drain(replay_stream(GenerationResult("", "stop", 1, 0))) == [
        StreamChunk("", "stop", 1, 0)
    ]


# -- serialisation --------------------------------------------------------------------------

RESULTS: list[InferenceResult] = [
    GenerationResult("text é ✓", "stop", 3, 4),
    EmbeddingResult([[0.1, -0.2], [1e-30, 3.5]], 7, truncated_inputs=1),
    ClassificationResult([[Label("positive", 0.9), Label("negative", 0.1)]], 2),
    TensorResult([Tensor("OUTPUT0", "FP32", (1, 2), [1.5, 2.0], {"b": 1, "a": 2}),
                  Tensor("NAMES", "BYTES", (2,), [b"\x00\xff", b"ok"])]),
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: type(r).__name__)
def test_results_round_trip_without_pickle(
    result: InferenceResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    codec = ResultCodec(derive_secrets(SECRET)[1])
    encoded = codec.encode(result)
    assert codec.decode(encoded) == result
    assert codec.encode(result) == encoded  # deterministic: dedup depends on it


def test_numpy_tensor_outputs_are_cached_as_their_values() -> None:
    np = pytest.importorskip("numpy")
    codec = ResultCodec(derive_secrets(SECRET)[1])
    result = TensorResult([Tensor("OUTPUT0", "FP32", (2,), np.array([1.5, 2.0], dtype=np.float32))])
    decoded = codec.decode(codec.encode(result))
    assert isinstance(decoded, TensorResult)
    assert decoded.outputs[0].data == [1.5, 2.0]


async def test_a_purge_by_another_worker_is_seen_without_a_restart(tmp_path: Path) -> None:
    memory = MemoryTier(MemoryOptions())
    one = CacheLayer([memory], secret=SECRET, generations=PurgeGenerations(tmp_path))
    two = CacheLayer([memory], secret=SECRET, generations=PurgeGenerations(tmp_path))
    request = CompletionRequest("shared directory", GREEDY)
    assert _key(one, request) == _key(two, request)
    await one.purge("echo")
    await two.purge("other")  # must not undo the first worker's purge
    assert _key(one, request) == _key(two, request)
    assert _key(one, request, model="other") == _key(two, request, model="other")
    fresh = CacheLayer([memory], secret=SECRET)
    assert _key(one, request) != _key(fresh, request)


class GatedTier(MemoryTier):
    """A memory tier whose writes wait for ``open`` (a slow disk or network write)."""

    def __init__(self) -> None:
        super().__init__(MemoryOptions())
        self.open = asyncio.Event()

    async def set(self, key: bytes, value: bytes) -> None:
        await self.open.wait()
        await super().set(key, value)


async def test_a_request_arriving_while_the_answer_is_being_stored_joins_it() -> None:
    tier = GatedTier()
    layer = CacheLayer([tier], secret=SECRET)
    request = CompletionRequest("slow store", GREEDY)
    counter = Counter(request)
    key = _key(layer, request)
    assert (await layer.lookup_or_run(key, counter.run))[1] == "miss"  # answered before stored
    assert await tier.get(key) is None
    assert (await layer.lookup_or_run(key, counter.run))[1] == "hit"
    assert counter.calls == 1
    tier.open.set()
    await layer.settle()
    assert await tier.get(key) is not None
    assert layer.stats()["in_flight"] == 0
