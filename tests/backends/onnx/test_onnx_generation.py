"""Text generation: the own KV-cache loop against transformers' greedy decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelyard.backends.onnx.backend import OnnxBackend
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.backend import LoadContext
from modelyard.core.errors import BadRequestError, ModelLoadError
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    GenerationParams,
    GenerationResult,
    Task,
)

PROMPT = "the cat sat on the"
GREEDY = GenerationParams(temperature=0.0, max_tokens=12)


async def _backend(path: Path, task: Task | None = None) -> OnnxBackend:
    task = task or OnnxBackend.detect_task(path, OnnxOptions())
    backend = OnnxBackend(
        LoadContext(
            model="g",
            version="1",
            task=task,
            source=str(path),
            path=path,
            options=msgspec.convert({}, OnnxOptions),
        )
    )
    await backend.load()
    return backend


def _reference_greedy(source: Path, prompt_ids: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy loop on the torch source model."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(source).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        )
    return [int(t) for t in out[0, len(prompt_ids) :]]


async def _generate(backend: OnnxBackend, request: Any) -> GenerationResult:
    (result,) = await backend.infer([request])
    assert isinstance(result, GenerationResult)
    return result


async def test_greedy_matches_transformers_token_for_token(
    tiny_gpt2: Path, tiny_gpt2_source: Path
) -> None:
    backend = await _backend(tiny_gpt2, Task.COMPLETION)
    runner = backend._runner
    runner.eos = set()  # compare a full-length run; the reference ignores EOS too
    prompt_ids = runner.prompt_ids(CompletionRequest(PROMPT))
    decoder = runner.start(CompletionRequest(PROMPT, GREEDY))
    while decoder.finish is None:
        decoder.step()
    expected = _reference_greedy(tiny_gpt2_source, prompt_ids, 12)
    assert decoder.text.ids == expected
    assert decoder.finish == "length" and decoder.completion_tokens == 12


async def test_stream_equals_the_whole_answer(tiny_gpt2: Path) -> None:
    backend = await _backend(tiny_gpt2, Task.COMPLETION)
    whole = await _generate(backend, CompletionRequest(PROMPT, GREEDY))
    chunks = [c async for c in backend.stream(CompletionRequest(PROMPT, GREEDY))]
    assert "".join(c.text for c in chunks) == whole.text
    assert chunks[-1].finish_reason == whole.finish_reason
    assert chunks[-1].completion_tokens == whole.completion_tokens
    assert chunks[-1].prompt_tokens == whole.prompt_tokens > 0
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_stop_sequences_cut_the_text_and_are_never_streamed(tiny_gpt2: Path) -> None:
    backend = await _backend(tiny_gpt2, Task.COMPLETION)
    runner = backend._runner
    runner.eos = set()
    whole = await _generate(
        backend, CompletionRequest(PROMPT, GenerationParams(temperature=0.0, max_tokens=24))
    )
    assert len(whole.text) > 6
    stop = whole.text[len(whole.text) // 2 : len(whole.text) // 2 + 3]
    params = GenerationParams(temperature=0.0, max_tokens=24, stop=(stop,))
    cut = await _generate(backend, CompletionRequest(PROMPT, params))
    assert cut.text == whole.text[: whole.text.index(stop)]
    assert cut.finish_reason == "stop"
    streamed = [c.text async for c in backend.stream(CompletionRequest(PROMPT, params))]
    assert "".join(streamed) == cut.text


async def test_seeded_sampling_repeats_and_top_p_narrows(tiny_gpt2: Path) -> None:
    backend = await _backend(tiny_gpt2, Task.COMPLETION)
    seeded = GenerationParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    first = await _generate(backend, CompletionRequest(PROMPT, seeded))
    again = await _generate(backend, CompletionRequest(PROMPT, seeded))
    assert first.text == again.text
    tiny_p = GenerationParams(temperature=1.0, top_p=1e-6, seed=3, max_tokens=10)
    greedy = await _generate(
        backend, CompletionRequest(PROMPT, msgspec.structs.replace(GREEDY, max_tokens=10))
    )
    assert (await _generate(backend, CompletionRequest(PROMPT, tiny_p))).text == greedy.text


async def test_context_limits(tiny_gpt2: Path) -> None:
    backend = await _backend(tiny_gpt2, Task.COMPLETION)
    backend._runner.eos = set()
    long = await _generate(backend, CompletionRequest(PROMPT, GenerationParams(temperature=0.0)))
    assert long.finish_reason == "length"
    assert long.prompt_tokens + long.completion_tokens == 64  # n_positions
    (error,) = await backend.infer([CompletionRequest("cat " * 80)])
    assert isinstance(error, BadRequestError) and "context is 64" in str(error)


async def test_chat_uses_the_template_with_a_sandbox(tiny_gpt2: Path) -> None:
    backend = await _backend(tiny_gpt2)
    assert backend.task == Task.CHAT
    runner = backend._runner
    request = ChatRequest((ChatMessage("user", "hello world"),), GREEDY)
    assert runner.render_chat(request) == "<|user|>hello world<|endoftext|><|assistant|>"
    chat = await _generate(backend, request)
    completion = runner.tokenizer.encode(runner.render_chat(request), add_special_tokens=False)
    assert chat.prompt_tokens == len(completion.ids)
    runner.chat_template = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(BadRequestError, match="chat template"):
        runner.render_chat(request)


async def test_chat_streams_over_openai_api(start_onnx_api: Any, tiny_gpt2: Path) -> None:
    api = await start_onnx_api({"name": "g", "backend": "onnx", "source": str(tiny_gpt2)})
    meta = (await api.client.get("/v2/models/g")).json()
    assert meta["parameters"]["task"] == "chat" and meta["parameters"]["chat_template"]
    body = {
        "model": "g",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
    }
    async with api.client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    plain = (await api.client.post("/v1/chat/completions", json={**body, "stream": False})).json()
    assert plain["choices"][0]["finish_reason"] in ("stop", "length")


async def test_chat_without_a_template_fails_to_load_with_the_reason(
    tiny_gpt2: Path, tmp_path: Path
) -> None:
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(tiny_gpt2, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = (plain / "tokenizer_config.json").read_text()
    (plain / "tokenizer_config.json").write_text(
        config.replace('"chat_template"', '"unused_template"')
    )
    assert OnnxBackend.detect_task(plain, OnnxOptions()) == Task.COMPLETION
    with pytest.raises(ModelLoadError, match="chat template"):
        await _backend(plain, Task.CHAT)
