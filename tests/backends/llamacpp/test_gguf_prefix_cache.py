"""The prefix cache on real llama.cpp: same greedy text as without it, tails cut, counted."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from gguf_testing import loaded

from modelyard.backends.llamacpp.options import GGUFOptions
from modelyard.backends.llamacpp.runtime import LlamaRuntime
from modelyard.backends.llamacpp.slots import common_prefix_length
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    GenerationResult,
    Task,
)

GREEDY = GenerationParams(max_tokens=16, temperature=0.0)
SYSTEM = " ".join(["the cat sat on the mat and the dog sat on a mat"] * 2)
#: Completions that share SYSTEM, diverge after it, repeat a whole prompt, extend an answer.
PROMPTS = [
    SYSTEM + " hello world",
    SYSTEM + " a dog",
    SYSTEM + " hello world",
    SYSTEM + " hello world to the cat",
    "the dog on the mat",
    SYSTEM[:40] + " of the world",
]


async def completions(backend: Any, prompts: list[str]) -> list[str]:
    texts = []
    for prompt in prompts:
        (result,) = await backend.infer([CompletionRequest(prompt, GREEDY)])
        assert isinstance(result, GenerationResult), result
        texts.append(result.text)
    return texts


@pytest.mark.parametrize("kv_unified", [False, True])
async def test_greedy_text_is_the_same_with_and_without_the_prefix_cache(
    tiny_gguf: Path, kv_unified: bool
) -> None:
    async with loaded(tiny_gguf, parallel=2, kv_unified=kv_unified, prefix_cache=False) as backend:
        cold = await completions(backend, PROMPTS)
        assert "prefix_cache" not in backend.info().parameters
        assert backend.counters() == {}
    async with loaded(tiny_gguf, parallel=2, kv_unified=kv_unified) as backend:
        warm = await completions(backend, PROMPTS)
        stats = backend.info().parameters["prefix_cache"]
        counters = backend.counters()
    assert warm == cold
    assert counters == {
        "prefix_cache_requests": 6, "prefix_cache_hits": 4,
        "prefix_cache_tokens_reused": stats["tokens_reused"],
        "prefix_cache_prompt_tokens": stats["prompt_tokens"],
    }
    # Prompts 2-4 reuse SYSTEM (or more); 5 shares nothing; 6 shares 90 characters' worth.
    assert stats["requests"] == 6
    assert stats["hits"] == 4
    assert stats["tokens_reused"] > 3 * 60
    assert stats["min_prefix_tokens"] == 16


async def test_concurrent_requests_reuse_their_own_prefixes_and_keep_their_text(
    tiny_gguf: Path,
) -> None:
    prompts = [f"{topic} {SYSTEM}" for topic in ("hello", "world", "dog", "cat")]
    second = [p + " on the mat" for p in prompts]
    async with loaded(tiny_gguf, parallel=4, prefix_cache=False) as backend:
        cold = [await completions(backend, [p]) for p in second]
    async with loaded(tiny_gguf, parallel=4) as backend:
        await backend.infer([CompletionRequest(p, GREEDY) for p in prompts])
        warm = await asyncio.gather(*(completions(backend, [p]) for p in second))
        stats = backend.info().parameters["prefix_cache"]
    assert warm == cold
    assert stats["hits"] == 4  # each second-round request found its own first-round slot


def test_keep_prefix_cuts_the_diverging_tail(tiny_gguf: Path) -> None:
    runtime = LlamaRuntime(tiny_gguf, GGUFOptions(n_ctx=256, n_threads=1), embeddings=False)
    try:
        lib, memory = runtime.lib, runtime._memory
        old = runtime.tokenize(SYSTEM + " hello world", add_special=True)
        new = runtime.tokenize(SYSTEM + " a dog on the mat", add_special=True)
        shared = next(i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b)
        assert runtime.decode([(0, t, i, i == len(old) - 1) for i, t in enumerate(old)]) == 0
        assert runtime.keep_prefix(0, shared, len(old)) == shared
        assert lib.llama_memory_seq_pos_max(memory, 0) == shared - 1
        rest = new[shared:]
        entries = [(0, t, shared + i, i == len(rest) - 1) for i, t in enumerate(rest)]
        assert runtime.decode(entries) == 0
        reused = runtime.sample(None, len(rest) - 1)
        runtime.forget(0)
        assert lib.llama_memory_seq_pos_max(memory, 0) == -1
        assert runtime.decode([(1, t, i, i == len(new) - 1) for i, t in enumerate(new)]) == 0
        assert reused == runtime.sample(None, len(new) - 1)
        # Nothing to keep: every cell goes.
        assert runtime.keep_prefix(1, 0, len(new)) == 0
        assert lib.llama_memory_seq_pos_max(memory, 1) == -1
    finally:
        runtime.close()


async def test_chat_turns_sharing_a_system_prompt_reuse_it(tiny_gguf: Path) -> None:
    system = ChatMessage("system", SYSTEM)
    turns = [ChatRequest((system, ChatMessage("user", q)), GREEDY) for q in ("hello", "dog")]
    async with loaded(tiny_gguf, Task.CHAT) as backend:
        first, second = [(await backend.infer([t]))[0] for t in turns]
        stats = backend.info().parameters["prefix_cache"]
        rendered = [backend._chat_tokens(t.messages) for t in turns]
    assert isinstance(first, GenerationResult) and isinstance(second, GenerationResult)
    assert stats["hits"] == 1
    # Everything up to the user's words: the system turn and the user turn's header.
    assert stats["tokens_reused"] == common_prefix_length(*rendered)
    assert stats["tokens_reused"] > 90


@pytest.mark.slow
async def test_smollm2_chat_with_a_cached_system_prompt_answers_the_same(
    smollm2_gguf: Path,
) -> None:
    system = ChatMessage("system", "You are a helpful assistant. " + "Be brief and exact. " * 40)
    questions = ["What is the capital of France?", "Name a large animal.",
                 "What is the capital of France?"]
    requests = [ChatRequest((system, ChatMessage("user", q)), GREEDY) for q in questions]
    answers: dict[bool, list[str]] = {}
    for cache in (False, True):
        async with loaded(smollm2_gguf, Task.CHAT, flash_attn="off", n_ctx=1024,
                          prefix_cache=cache) as backend:
            results = [(await backend.infer([r]))[0] for r in requests]
            answers[cache] = [r.text for r in results]  # type: ignore[union-attr]
            if cache:
                stats = backend.info().parameters["prefix_cache"]
    assert answers[True] == answers[False]
    assert stats["hits"] == 2 and stats["tokens_reused"] > 2 * 200
