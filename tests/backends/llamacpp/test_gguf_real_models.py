"""The demo GGUF models: our engine's greedy text equals llama-cpp-python's own.

Flash attention is pinned off on both sides (llama-cpp-python's default) so the same kernels
run. Gemma 3 is only compared lone: its Q4_K weights are repacked for four-row matrix
kernels, so in a batch a row's logits can shift by ~1 and flip a near tie (llama.cpp's CPU
kernels are not batch-invariant; llama-server behaves the same). SmolLM2's Q4_1 is not
repacked, so it also checks that concurrent sequences do not disturb one another.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf_testing import loaded

from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    GenerationResult,
    Task,
)

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The best way to learn",
]
GREEDY = GenerationParams(max_tokens=32, temperature=0.0)


def llama_cpp_completions(path: Path, prompts: list[str]) -> list[str]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    texts = []
    for prompt in prompts:
        llm.reset()  # no KV prefix reuse between prompts: each is evaluated like ours
        texts.append(
            llm.create_completion(prompt, max_tokens=32, temperature=0)["choices"][0]["text"]
        )
    llm.close()
    return texts


async def lone_completions(backend: object, prompts: list[str]) -> list[str]:
    texts = []
    for prompt in prompts:
        (result,) = await backend.infer([CompletionRequest(prompt, GREEDY)])  # type: ignore[attr-defined]
        assert isinstance(result, GenerationResult), result
        texts.append(result.text)
    return texts


async def test_smollm2_greedy_completion_equals_llama_cpp_python_alone_and_concurrently(
    smollm2_gguf: Path,
) -> None:
    async with loaded(smollm2_gguf, Task.CHAT, flash_attn="off", n_ctx=1024) as backend:
        lone = await lone_completions(backend, PROMPTS)
        together = await backend.infer([CompletionRequest(p, GREEDY) for p in PROMPTS])
    assert lone == llama_cpp_completions(smollm2_gguf, PROMPTS)
    assert [r.text for r in together] == lone  # type: ignore[union-attr]


async def test_smollm2_chat_uses_its_template_like_llama_cpp_python(smollm2_gguf: Path) -> None:
    import llama_cpp

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    async with loaded(smollm2_gguf, Task.CHAT, flash_attn="off", n_ctx=1024) as backend:
        (ours,) = await backend.infer(
            [ChatRequest((ChatMessage("user", messages[0]["content"]),), GREEDY)]
        )
    llm = llama_cpp.Llama(
        str(smollm2_gguf), n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False
    )
    theirs = llm.create_chat_completion(messages, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    llm.close()
    assert isinstance(ours, GenerationResult)
    assert ours.text == theirs["choices"][0]["message"]["content"]  # type: ignore[index]
    assert ours.prompt_tokens == theirs["usage"]["prompt_tokens"]  # type: ignore[index]


async def test_gemma_greedy_completion_equals_llama_cpp_python(gemma_gguf: Path) -> None:
    async with loaded(gemma_gguf, Task.COMPLETION, flash_attn="off", n_ctx=1024) as backend:
        assert backend.info().parameters["quantization"] == "Q4_K_M"
        lone = await lone_completions(backend, PROMPTS[:3])
    assert lone == llama_cpp_completions(gemma_gguf, PROMPTS[:3])
