"""The continuous-batching engine, driven by a fake runtime so every step can be inspected."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.backends.llamacpp.engine import Engine, Generation, StopMatcher
from modelyard.core.errors import BackendError, ServiceUnavailableError
from modelyard.core.types import GenerationParams, StreamChunk

LETTERS = "abcdefghijklmnopqrstuvwxyz"
GREEDY = GenerationParams(temperature=0.0)


class FakeRuntime:
    """Stands in for ``LlamaRuntime``: after token t comes t + 1, and token t spells a letter."""

    path = Path("fake.gguf")

    def __init__(
        self,
        *,
        slots: int = 2,
        n_batch: int = 64,
        n_ctx_seq: int = 1000,
        eog: int | None = None,
        pieces: dict[int, bytes] | None = None,
        step_cost_s: float = 0.0,
    ) -> None:
        self.n_seq_max = slots
        self.n_batch = n_batch
        self.n_ctx_seq = n_ctx_seq
        self.eog = eog
        self.pieces = pieces or {}
        self.step_cost_s = step_cost_s
        self.batches: list[list[tuple[int, int, int, bool]]] = []
        self.forgotten: list[int] = []
        self.kept: list[tuple[int, int, int]] = []  # keep_prefix calls: (seq, keep, cached)
        self.can_cut = True  # False: like recurrent memory, a partial cut clears everything
        self.live_samplers = 0
        self.fail_with: int | None = None
        self.refuse_sampler = False
        self.closed = threading.Event()

    def decode(self, entries: list[tuple[int, int, int, bool]]) -> int:
        if self.step_cost_s:
            time.sleep(self.step_cost_s)  # what a real decode costs; keeps the loop from spinning
        self.batches.append(list(entries))
        status, self.fail_with = self.fail_with, None
        return status or 0

    def sample(self, sampler: Any, index: int) -> int:
        _, token, _, wants_logits = self.batches[-1][index]
        assert wants_logits, "sampled a batch entry that has no logits"
        return token + 1

    def new_sampler(self, params: GenerationParams) -> object:
        if self.refuse_sampler:
            raise RuntimeError("no sampler for you")
        self.live_samplers += 1
        return object()

    def free_sampler(self, sampler: object) -> None:
        self.live_samplers -= 1

    def forget(self, seq: int) -> None:
        self.forgotten.append(seq)

    def keep_prefix(self, seq: int, keep: int, cached: int) -> int:
        self.kept.append((seq, keep, cached))
        if keep and self.can_cut:
            return keep
        self.forget(seq)
        return 0

    def is_eog(self, token: int) -> bool:
        return token == self.eog

    def piece(self, token: int) -> bytes:
        return self.pieces.get(token, LETTERS[token % 26].encode())

    def close(self) -> None:
        self.closed.set()


@pytest.fixture
async def engine_for() -> AsyncIterator[Any]:
    engines: list[Engine] = []

    def start(
        runtime: FakeRuntime, *, max_queue: int = 8, prefill_chunk: int = 8, **prefix: Any
    ) -> Engine:
        engine = Engine(runtime, max_queue=max_queue, prefill_chunk=prefill_chunk, **prefix)  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine

    yield start
    for engine in engines:
        await engine.stop()


async def collect(generation: Generation) -> list[StreamChunk]:
    async with asyncio.timeout(10):
        return [chunk async for chunk in generation.chunks()]


def text_of(chunks: list[StreamChunk]) -> str:
    return "".join(c.text for c in chunks)


# -- stop sequences --------------------------------------------------------------------------


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    stops = StopMatcher(["</end>", "STOP"])
    assert stops.push("Hello <") == ("Hello ", False)
    assert stops.push("/en") == ("", False)
    assert stops.push("x") == ("</enx", False)
    assert stops.push("ST") == ("", False)
    assert stops.push("OP and more") == ("", True)


def test_stop_matcher_cuts_at_the_earliest_stop_and_flushes_a_dangling_prefix() -> None:
    stops = StopMatcher(["bc", "ab"])
    assert stops.push("xabc") == ("x", True)
    dangling = StopMatcher(["world"])
    assert dangling.push("hello wor") == ("hello ", False)
    assert dangling.flush() == "wor"


async def test_a_stop_sequence_spanning_tokens_never_leaks_into_the_stream(engine_for: Any) -> None:
    engine = engine_for(FakeRuntime())
    params = GenerationParams(temperature=0.0, stop=("efg",))
    chunks = await collect(engine.submit([0], params, 100))
    assert text_of(chunks) == "bcd"
    assert all("e" not in c.text for c in chunks)
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", 6)


async def test_a_held_back_prefix_that_does_not_complete_is_released(engine_for: Any) -> None:
    engine = engine_for(FakeRuntime())
    params = GenerationParams(temperature=0.0, stop=("ez",))
    chunks = await collect(engine.submit([0], params, 6))
    assert text_of(chunks) == "bcdefg"
    assert chunks[-1].finish_reason == "length"


# -- finishing -------------------------------------------------------------------------------


async def test_max_tokens_ends_with_length_and_counts_tokens(engine_for: Any) -> None:
    engine = engine_for(FakeRuntime())
    chunks = await collect(engine.submit([7, 8, 0], GREEDY, 5))
    assert text_of(chunks) == "bcdef"
    last = chunks[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("length", 3, 5)


async def test_an_end_of_generation_token_ends_with_stop_and_is_not_text(engine_for: Any) -> None:
    engine = engine_for(FakeRuntime(eog=5))
    chunks = await collect(engine.submit([0], GREEDY, 100))
    assert text_of(chunks) == "bcde"
    assert (chunks[-1].finish_reason, chunks[-1].completion_tokens) == ("stop", 4)


async def test_the_context_of_a_slot_bounds_generation(engine_for: Any) -> None:
    runtime = FakeRuntime(n_ctx_seq=10)
    engine = engine_for(runtime)
    chunks = await collect(engine.submit([0, 0, 0, 0], GREEDY, 1000))
    assert chunks[-1].finish_reason == "length"
    assert max(pos for batch in runtime.batches for _, _, pos, _ in batch) == 9


async def test_utf8_split_across_tokens_is_emitted_whole(engine_for: Any) -> None:
    engine = engine_for(FakeRuntime(pieces={1: b"\xc3", 2: b"\xa9", 3: b"!"}))
    chunks = await collect(engine.submit([0], GREEDY, 3))
    assert text_of(chunks) == "é!"
    assert all("\ufffd" not in c.text for c in chunks)


# -- batching --------------------------------------------------------------------------------


async def test_sequences_decode_together_in_one_batch_per_step(engine_for: Any) -> None:
    # Each step costs a little, so all three requests (submitted in one loop turn) are
    # admitted while the first is still decoding, however loaded the machine is.
    runtime = FakeRuntime(slots=3, step_cost_s=0.005)
    engine = engine_for(runtime)
    prompts = [[0], [10, 11], [20, 21, 22]]
    results = await asyncio.gather(*(collect(engine.submit(p, GREEDY, 4)) for p in prompts))
    assert [text_of(r) for r in results] == ["bcde", "mnop", "xyza"]
    decode_steps = [b for b in runtime.batches if all(wants for *_, wants in b)]
    assert any(len({seq for seq, *_ in b}) == 3 for b in decode_steps)
    # Every slot ends clean: KV cells dropped, samplers freed.
    assert sorted(runtime.forgotten) == [0, 1, 2]
    assert runtime.live_samplers == 0


async def test_batches_are_ordered_by_sequence_id_whatever_order_slots_free_up(
    engine_for: Any,
) -> None:
    # Out-of-order sequences make llama.cpp split a batch into more micro-batches.
    runtime = FakeRuntime(slots=4)
    engine = engine_for(runtime)
    first = [engine.submit([0], GREEDY, n) for n in (9, 3, 6, 1)]  # finish in scrambled order
    await asyncio.gather(*(collect(g) for g in first))
    second = [engine.submit([0] * (n + 1), GREEDY, 5) for n in range(4)]
    await asyncio.gather(*(collect(g) for g in second))
    for batch in runtime.batches:
        ids = [seq for seq, *_ in batch]
        assert ids == sorted(ids), ids


async def test_newcomers_take_the_lowest_free_ids_so_active_ids_stay_consecutive(
    engine_for: Any,
) -> None:
    # With a KV stream per sequence llama.cpp puts only consecutive ids in one micro-batch:
    # after 8 sequences free up in scrambled order, 4 newcomers must get 0-3, not 4 ids at random.
    runtime = FakeRuntime(slots=8)
    engine = engine_for(runtime)
    first = [engine.submit([0], GREEDY, n) for n in (7, 2, 9, 1, 5, 3, 8, 4)]
    await asyncio.gather(*(collect(g) for g in first))
    runtime.batches.clear()
    second = [engine.submit([0, 1], GREEDY, 6) for _ in range(4)]
    await asyncio.gather(*(collect(g) for g in second))
    used = {seq for batch in runtime.batches for seq, *_ in batch}
    assert used == {0, 1, 2, 3}


async def test_a_newcomers_prompt_is_fed_in_chunks_between_running_decodes(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=2, n_batch=64, step_cost_s=0.001)
    engine = engine_for(runtime, prefill_chunk=8)
    running = engine.submit([0], GREEDY, 200).chunks()
    await anext(running)  # the first sequence is decoding now
    newcomer = engine.submit([500] * 40, GREEDY, 2)
    await collect(newcomer)
    await running.aclose()
    prompt_steps = [b for b in runtime.batches if any(tok == 500 for _, tok, _, _ in b)]
    assert len(prompt_steps) == 5  # 40 prompt tokens, 8 per step
    for batch in prompt_steps:
        assert sum(tok == 500 for _, tok, _, _ in batch) == 8
        # ... and the running stream still got its next token in each of those steps.
        assert any(tok < 500 and wants for _, tok, _, wants in batch)


async def test_an_idle_engine_takes_a_whole_prompt_in_one_step(engine_for: Any) -> None:
    runtime = FakeRuntime(n_batch=64)
    engine = engine_for(runtime, prefill_chunk=8)
    await collect(engine.submit([50] * 40, GREEDY, 1))
    assert len(runtime.batches[0]) == 40


# -- slots, queue and cancellation ------------------------------------------------------------


async def test_a_full_queue_answers_503_with_retry_after(engine_for: Any) -> None:
    engine = engine_for(FakeRuntime(slots=1, step_cost_s=0.001), max_queue=1)
    running = engine.submit([0], GREEDY, 10_000).chunks()
    await anext(running)
    waiting = engine.submit([0], GREEDY, 3)
    with pytest.raises(ServiceUnavailableError) as refused:
        engine.submit([0], GREEDY, 3)
    assert refused.value.headers["Retry-After"] == "1"
    await running.aclose()
    assert text_of(await collect(waiting)) == "bcd"


async def test_closing_a_stream_frees_its_slot_at_once(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1, step_cost_s=0.001)
    engine = engine_for(runtime, max_queue=0)
    stream = engine.submit([0], GREEDY, 1_000_000).chunks()
    await anext(stream)
    await stream.aclose()  # what the API does when the client disconnects
    # The only slot is free again: the next request is admitted and runs to its end.
    assert text_of(await collect(engine.submit([0], GREEDY, 2))) == "bc"
    assert runtime.forgotten.count(0) == 2


async def test_a_cancelled_waiter_never_runs(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1, step_cost_s=0.001)
    engine = engine_for(runtime)
    running = engine.submit([0], GREEDY, 10_000).chunks()
    await anext(running)
    waiter = engine.submit([77], GREEDY, 3)
    waiter.close()
    await running.aclose()
    await collect(engine.submit([0], GREEDY, 1))
    assert not any(tok == 77 for batch in runtime.batches for _, tok, _, _ in batch)
    assert engine.open == 0


# -- failures ----------------------------------------------------------------------------------


async def test_a_failed_decode_fails_the_sequences_in_that_batch(engine_for: Any) -> None:
    runtime = FakeRuntime()
    engine = engine_for(runtime)
    runtime.fail_with = 1
    with pytest.raises(ServiceUnavailableError, match="context memory is full"):
        await collect(engine.submit([0], GREEDY, 3))
    runtime.fail_with = -3
    with pytest.raises(BackendError, match="status -3"):
        await collect(engine.submit([0], GREEDY, 3))
    assert text_of(await collect(engine.submit([0], GREEDY, 2))) == "bc"


async def test_a_request_whose_sampler_cannot_be_built_fails_alone(engine_for: Any) -> None:
    runtime = FakeRuntime()
    engine = engine_for(runtime)
    runtime.refuse_sampler = True
    with pytest.raises(
        BackendError, match="sampler setup failed: RuntimeError: no sampler for you"
    ):
        await collect(engine.submit([0], GREEDY, 3))
    runtime.refuse_sampler = False
    assert text_of(await collect(engine.submit([0], GREEDY, 2))) == "bc"


async def test_stopping_fails_running_and_waiting_requests_with_503_and_frees_llama() -> None:
    runtime = FakeRuntime(slots=1, step_cost_s=0.001)
    engine = Engine(runtime, max_queue=4, prefill_chunk=8)  # type: ignore[arg-type]
    engine.start()
    running = engine.submit([0], GREEDY, 1_000_000).chunks()
    await anext(running)
    waiting = engine.submit([0], GREEDY, 3)
    await engine.stop()
    with pytest.raises(ServiceUnavailableError, match="unloading"):
        async for _ in running:
            pass
    with pytest.raises(ServiceUnavailableError, match="unloading"):
        await collect(waiting)
    assert runtime.closed.is_set()
    with pytest.raises(ServiceUnavailableError):
        engine.submit([0], GREEDY, 1)


# -- prefix cache ----------------------------------------------------------------------------

PREFIX_ON = {"prefix_cache": True, "min_prefix_tokens": 4}


def prompt_positions(runtime: FakeRuntime, tokens: set[int]) -> list[int]:
    """Positions at which any of ``tokens`` was fed, over every batch so far."""
    return [pos for batch in runtime.batches for _, tok, pos, _ in batch if tok in tokens]


async def test_a_shared_prefix_is_not_decoded_again(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1)
    engine = engine_for(runtime, **PREFIX_ON)
    system = list(range(100, 130))
    await collect(engine.submit([*system, 40, 41], GREEDY, 3))
    runtime.batches.clear()
    second = await collect(engine.submit([*system, 60, 61, 62], GREEDY, 3))
    fed = [(pos, tok) for batch in runtime.batches for _, tok, pos, _ in batch]
    # Only the new suffix went through llama_decode, at the positions after the prefix.
    assert fed[:3] == [(30, 60), (31, 61), (32, 62)]
    assert not any(100 <= tok < 130 for _, tok in fed)
    # The cells past the prefix (the old tail, 2 prompt + 2 fed output tokens) were dropped.
    assert runtime.kept[-1] == (0, 30, 34)
    assert engine.prefix_cache_stats().hits == 1
    assert engine.prefix_cache_stats().tokens_reused == 30
    assert text_of(second) == "lmn"  # what 62 -> 63, 64, 65 spell without any cache
    assert (second[-1].prompt_tokens, second[-1].completion_tokens) == (33, 3)


async def test_a_prompt_cached_whole_still_decodes_its_last_token(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1)
    engine = engine_for(runtime, **PREFIX_ON)
    prompt = list(range(100, 120))
    first = await collect(engine.submit(prompt, GREEDY, 2))
    runtime.batches.clear()
    again = await collect(engine.submit(prompt, GREEDY, 2))
    # Its logits give the first token: llama-server's "evaluate at least one token" rule.
    assert runtime.batches[0] == [(0, 119, 19, True)]
    assert runtime.kept[-1] == (0, 19, 21)
    assert text_of(again) == text_of(first)


async def test_the_generated_tokens_are_part_of_the_cached_prefix(engine_for: Any) -> None:
    # A chat's next turn repeats the previous answer: it is in the cells already.
    runtime = FakeRuntime(slots=1)
    engine = engine_for(runtime, **PREFIX_ON)
    prompt = list(range(100, 110))
    await collect(engine.submit(prompt, GREEDY, 4))  # samples 110, 111, 112, 113
    runtime.batches.clear()
    await collect(engine.submit([*prompt, 110, 111, 112, 113, 7], GREEDY, 1))
    # 110-112 were fed while generating; 113 (sampled last) was never fed, so it is decoded.
    assert runtime.batches[0] == [(0, 113, 13, False), (0, 7, 14, True)]


async def test_a_newcomer_goes_to_the_free_slot_holding_its_longest_prefix(
    engine_for: Any,
) -> None:
    runtime = FakeRuntime(slots=3, step_cost_s=0.002)
    engine = engine_for(runtime, **PREFIX_ON)
    long_a, long_b = list(range(100, 140)), list(range(200, 240))
    await asyncio.gather(  # admitted together: slots 0 and 1
        collect(engine.submit(long_a, GREEDY, 2)), collect(engine.submit(long_b, GREEDY, 2))
    )
    runtime.batches.clear()
    await collect(engine.submit([*long_b[:25], *long_a[:30], 5], GREEDY, 2))
    assert {seq for batch in runtime.batches for seq, *_ in batch} == {1}
    assert runtime.kept[-1] == (1, 25, 41)
    runtime.batches.clear()
    await collect(engine.submit([*long_a[:12], 5], GREEDY, 2))
    assert {seq for batch in runtime.batches for seq, *_ in batch} == {0}


async def test_a_prefix_shorter_than_min_prefix_tokens_is_not_reused(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1)
    engine = engine_for(runtime, prefix_cache=True, min_prefix_tokens=8)
    await collect(engine.submit(list(range(100, 120)), GREEDY, 1))
    runtime.batches.clear()
    await collect(engine.submit([*range(100, 107), 5], GREEDY, 1))
    assert prompt_positions(runtime, set(range(100, 107))) == list(range(7))
    assert runtime.kept[-1] == (0, 0, 20)
    assert runtime.forgotten == [0]
    stats = engine.prefix_cache_stats()
    assert (stats.requests, stats.hits, stats.tokens_reused, stats.prompt_tokens) == (2, 0, 0, 28)


async def test_with_the_prefix_cache_off_nothing_is_reused(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1)
    engine = engine_for(runtime, prefix_cache=False, min_prefix_tokens=4)
    prompt = list(range(100, 130))
    first = await collect(engine.submit(prompt, GREEDY, 3))
    again = await collect(engine.submit(prompt, GREEDY, 3))
    assert prompt_positions(runtime, set(prompt)) == [*range(30), *range(30)]
    assert runtime.forgotten == [0, 0]  # cleared as each request ended
    assert runtime.kept == []
    assert text_of(again) == text_of(first)
    assert engine.prefix_cache_stats().hits == 0


async def test_a_failed_decode_leaves_nothing_to_reuse(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1)
    engine = engine_for(runtime, **PREFIX_ON)
    prompt = list(range(100, 130))
    runtime.fail_with = -3
    with pytest.raises(BackendError):
        await collect(engine.submit(prompt, GREEDY, 3))
    runtime.batches.clear()
    await collect(engine.submit(prompt, GREEDY, 3))
    assert prompt_positions(runtime, set(prompt)) == list(range(30))
    assert engine.prefix_cache_stats().hits == 0


async def test_memory_that_cannot_be_cut_is_decoded_again_whole(engine_for: Any) -> None:
    runtime = FakeRuntime(slots=1)
    runtime.can_cut = False  # what llama.cpp says for recurrent or sliding-window memory
    engine = engine_for(runtime, **PREFIX_ON)
    prompt = list(range(100, 130))
    first = await collect(engine.submit(prompt, GREEDY, 3))
    runtime.batches.clear()
    again = await collect(engine.submit([*prompt[:20], 7], GREEDY, 3))
    assert prompt_positions(runtime, set(prompt[:20])) == list(range(20))
    assert engine.prefix_cache_stats().hits == 0
    assert text_of(first) == "abc" and text_of(again) == "ijk"


async def test_a_cancelled_stream_leaves_its_prompt_for_the_next_request(
    engine_for: Any,
) -> None:
    runtime = FakeRuntime(slots=1, step_cost_s=0.001)
    engine = engine_for(runtime, **PREFIX_ON)
    prompt = list(range(100, 130))
    stream = engine.submit(prompt, GREEDY, 1_000_000).chunks()
    await anext(stream)
    await stream.aclose()  # the client went away mid-stream
    await collect(engine.submit([*prompt, 7], GREEDY, 2))
    # Prompt and generated tokens stayed in the cells; only the new token is decoded.
    assert [b for b in runtime.batches if (0, 7, 30, True) in b] == [[(0, 7, 30, True)]]
    assert prompt_positions(runtime, set(prompt)) == list(range(30))  # fed once
    assert runtime.kept[-1][:2] == (0, 30)
