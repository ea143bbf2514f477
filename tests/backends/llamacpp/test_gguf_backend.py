"""``GGUFBackend`` on the tiny llama GGUF: generation, sampling, chat templates, embeddings."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
from gguf_testing import MakeGGUF, load_context, loaded

from modelyard.backends.llamacpp.backend import GGUFBackend
from modelyard.backends.llamacpp.options import GGUFOptions
from modelyard.core.errors import BackendError, BadRequestError, ModelLoadError
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    Task,
)

GREEDY = GenerationParams(max_tokens=24, temperature=0.0)
PROMPTS = ["hello world", "the cat sat on the mat", "abc", "dog", "a", "xyz", "on the", "mat"]


async def complete(
    backend: GGUFBackend, prompt: str, params: GenerationParams = GREEDY
) -> GenerationResult:
    (result,) = await backend.infer([CompletionRequest(prompt, params)])
    assert isinstance(result, GenerationResult), result
    return result


# -- loading and metadata ------------------------------------------------------------------


def test_the_task_is_detected_from_the_header(tiny_gguf: Path, make_gguf: MakeGGUF) -> None:
    options = GGUFOptions()
    assert GGUFBackend.detect_task(tiny_gguf, options) == Task.CHAT
    bare = make_gguf("tiny-bare", chat_template=None)
    assert GGUFBackend.detect_task(bare, options) == Task.COMPLETION
    assert GGUFBackend.detect_task(bare, GGUFOptions(chat_format="chatml")) == Task.CHAT
    embed = make_gguf("tiny-embed", chat_template=None, pooling_type=1)
    assert GGUFBackend.detect_task(embed, options) == Task.EMBEDDINGS


async def test_metadata_reports_device_slots_context_and_template(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf, Task.CHAT, parallel=3, n_ctx=256, max_queue=5) as backend:
        info = backend.info()
        params = info.parameters
        assert params["device"] == "CPU" and params["gpu_layers"] == 0
        assert (params["slots"], params["context_per_slot"], params["max_queue"]) == (3, 256, 5)
        assert (params["architecture"], params["quantization"]) == ("llama", "ALL_F32")
        assert params["chat_template"] == "gguf file"
        assert info.platform == "llama.cpp"
        assert backend.max_batch_size == 3
        assert (await backend.health()).healthy


async def test_a_truncated_file_fails_to_load_with_the_reason(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:-1000])
    backend = GGUFBackend(load_context(cut, Task.COMPLETION))
    with pytest.raises(ModelLoadError, match="truncated GGUF file"):
        await backend.load()


async def test_a_chat_model_without_a_template_needs_a_chat_format(make_gguf: MakeGGUF) -> None:
    bare = make_gguf("tiny-bare", chat_template=None)
    backend = GGUFBackend(load_context(bare, Task.CHAT))
    with pytest.raises(ModelLoadError, match="has no chat template; set options.chat_format"):
        await backend.load()
    async with loaded(bare, Task.CHAT, chat_format="chatml") as chat:
        assert chat.info().parameters["chat_template"] == "chat_format chatml"
        (answer,) = await chat.infer([ChatRequest((ChatMessage("user", "hi"),), GREEDY)])
        assert isinstance(answer, GenerationResult) and answer.completion_tokens == 24


# -- generation ----------------------------------------------------------------------------


async def test_greedy_completion_equals_llama_cpp_python(tiny_gguf: Path) -> None:
    import llama_cpp

    async with loaded(tiny_gguf, flash_attn="off") as backend:
        ours = [(await complete(backend, p)).text for p in PROMPTS[:3]]
    llm = llama_cpp.Llama(str(tiny_gguf), n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False)
    theirs = []
    for prompt in PROMPTS[:3]:
        llm.reset()  # no KV prefix reuse: a different batch split changes the numerics
        theirs.append(
            llm.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
        )
    assert ours == theirs


async def test_concurrent_requests_each_get_their_lone_output(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf, parallel=8) as backend:
        lone = [(await complete(backend, p)).text for p in PROMPTS]
        together = await backend.infer([CompletionRequest(p, GREEDY) for p in PROMPTS])
        streams = await asyncio.gather(*(_streamed(backend, p) for p in PROMPTS))
    assert [r.text for r in together] == lone  # type: ignore[union-attr]
    assert streams == lone
    assert len(set(lone)) == len(lone)


async def test_a_unified_kv_buffer_keeps_each_slots_share(tiny_gguf: Path) -> None:
    # Without the prefix cache: a batched request that reuses its lone run's cells, which sit
    # elsewhere in the shared buffer, sums attention in another order and may flip a near tie
    # (test_gguf_prefix_cache.py covers the cache on a unified buffer one request at a time).
    async with loaded(
        tiny_gguf, parallel=4, n_ctx=256, kv_unified=True, prefix_cache=False
    ) as backend:
        assert backend.info().parameters["context_per_slot"] == 256
        lone = [(await complete(backend, p)).text for p in PROMPTS[:4]]
        together = await backend.infer([CompletionRequest(p, GREEDY) for p in PROMPTS[:4]])
    assert [r.text for r in together] == lone  # type: ignore[union-attr]


async def _streamed(backend: GGUFBackend, prompt: str, params: GenerationParams = GREEDY) -> str:
    return "".join([c.text async for c in backend.stream(CompletionRequest(prompt, params))])


async def test_streaming_ends_with_finish_reason_and_counts(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf) as backend:
        chunks = [c async for c in backend.stream(CompletionRequest("hello world", GREEDY))]
        whole = await complete(backend, "hello world")
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.finish_reason, last.completion_tokens) == ("length", 24)
    assert last.prompt_tokens == whole.prompt_tokens
    assert "".join(c.text for c in chunks) == whole.text


async def test_stop_sequences_cut_the_text_in_infer_and_stream(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf) as backend:
        full = (await complete(backend, "the cat sat on the mat")).text
        stop = full[10:14]
        params = GenerationParams(max_tokens=24, temperature=0.0, stop=(stop, "never seen"))
        cut = await complete(backend, "the cat sat on the mat", params)
        chunks = [
            c async for c in backend.stream(CompletionRequest("the cat sat on the mat", params))
        ]
    expected = full[: full.index(stop)]
    assert (cut.text, cut.finish_reason) == (expected, "stop")
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop"


async def test_logit_bias_can_force_the_end_token(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf) as backend:
        params = GenerationParams(max_tokens=24, temperature=0.0, logit_bias={2: 100.0})
        result = await complete(backend, "hello", params)
        (refused,) = await backend.infer(
            [CompletionRequest("hi", GenerationParams(logit_bias={99999: 1.0}))]
        )
    assert isinstance(refused, BadRequestError)
    assert "logit_bias: token id 99999 is outside the vocabulary" in refused.detail
    assert (result.text, result.finish_reason, result.completion_tokens) == ("", "stop", 0)


async def test_sampling_parameters(tiny_gguf: Path) -> None:
    def sampled(**kw: object) -> GenerationParams:
        return GenerationParams(max_tokens=24, **kw)  # type: ignore[arg-type]

    async with loaded(tiny_gguf) as backend:
        greedy = (await complete(backend, "dog")).text
        same_seed = [
            (await complete(backend, "dog", sampled(temperature=1.5, seed=7))).text
            for _ in range(2)
        ]
        other_seeds = {
            (await complete(backend, "dog", sampled(temperature=1.5, seed=s))).text
            for s in range(4)
        }
        top_k_1 = (await complete(backend, "dog", sampled(temperature=1.0, top_k=1, seed=3))).text
        top_p = (await complete(backend, "dog", sampled(temperature=1.0, top_p=1e-6, seed=3))).text
        penalised = (await complete(backend, "dog", sampled(temperature=0.0, presence_penalty=2.0,
                                                            frequency_penalty=2.0))).text
    assert same_seed[0] == same_seed[1]
    assert len(other_seeds) > 1
    assert top_k_1 == greedy and top_p == greedy
    assert penalised != greedy


async def test_a_prompt_longer_than_a_slot_is_refused(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf, n_ctx=256) as backend:
        (refused,) = await backend.infer(
            [CompletionRequest("the cat sat on the mat " * 30, GREEDY)]
        )
        with pytest.raises(
            BadRequestError, match=r"prompt is \d+ tokens; this model's context holds 256"
        ):
            await anext(backend.stream(CompletionRequest("the cat sat on the mat " * 30, GREEDY)))
    assert isinstance(refused, BadRequestError)


# -- chat ----------------------------------------------------------------------------------


async def test_chat_renders_the_models_template(tiny_gguf: Path) -> None:
    messages = (ChatMessage("system", "be nice"), ChatMessage("user", "hello world"))
    rendered = (
        "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    async with loaded(tiny_gguf, Task.CHAT) as backend:
        (chat,) = await backend.infer([ChatRequest(messages, GREEDY)])
        raw = await complete(backend, rendered)
    assert isinstance(chat, GenerationResult)
    assert (chat.text, chat.prompt_tokens) == (raw.text, raw.prompt_tokens)


async def test_a_template_reaching_for_python_internals_renders_nothing(
    make_gguf: MakeGGUF,
) -> None:
    evil = make_gguf(
        "tiny-evil",
        chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}"
        "{{ m.content }}{% endfor %}",
    )
    async with loaded(evil, Task.CHAT) as backend:
        (refused,) = await backend.infer([ChatRequest((ChatMessage("user", "hi"),), GREEDY)])
        # The model still serves raw completions.
        assert (await complete(backend, "hello")).completion_tokens == 24
    assert isinstance(refused, BackendError)
    assert "refused by the sandbox: access to attribute '__class__'" in refused.detail
    assert "<class" not in refused.detail  # nothing from Python's internals came back


async def test_a_template_that_rejects_the_conversation_is_a_bad_request(
    make_gguf: MakeGGUF,
) -> None:
    strict = make_gguf(
        "tiny-strict",
        chat_template="{% if messages[0].role != 'system' %}"
        "{{ raise_exception('the first message must be a system message') }}{% endif %}x",
    )
    async with loaded(strict, Task.CHAT) as backend:
        (result,) = await backend.infer([ChatRequest((ChatMessage("user", "hi"),), GREEDY)])
    assert isinstance(result, BadRequestError)
    assert result.detail == (
        "the chat template rejected the messages: the first message must be a system message"
    )


async def test_a_runaway_template_is_stopped_and_answered_with_400(make_gguf: MakeGGUF) -> None:
    slow = make_gguf(
        "tiny-slow", chat_template="{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}",
    )
    async with loaded(slow, Task.CHAT, template_timeout_s=0.1) as backend:
        (result,) = await backend.infer([ChatRequest((ChatMessage("user", "hi"),), GREEDY)])
    assert isinstance(result, BadRequestError)
    assert result.detail == "chat template took longer than 0.1s"


# -- embeddings ----------------------------------------------------------------------------


async def test_embeddings_are_pooled_unit_vectors(make_gguf: MakeGGUF) -> None:
    import llama_cpp

    path = make_gguf("tiny-embed", chat_template=None, pooling_type=1)
    texts = ("hello world", "the cat", "dog")
    async with loaded(path, Task.EMBEDDINGS) as backend:
        (result,) = await backend.infer([EmbeddingRequest(texts)])
        assert backend.info().outputs[0].shape == (-1, 64)
    assert isinstance(result, EmbeddingResult)
    assert [len(v) for v in result.embeddings] == [64, 64, 64]
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5) for v in result.embeddings)
    llm = llama_cpp.Llama(
        str(path), embedding=True, n_ctx=256, n_threads=1, n_threads_batch=1, verbose=False
    )
    reference = llm.embed(list(texts), normalize=True)
    for ours, theirs in zip(result.embeddings, reference, strict=True):
        assert sum(a * b for a, b in zip(ours, theirs, strict=True)) > 0.999
    assert result.prompt_tokens > 0 and result.truncated_inputs == 0


# -- lifecycle -----------------------------------------------------------------------------


async def test_after_unload_requests_fail_cleanly(tiny_gguf: Path) -> None:
    async with loaded(tiny_gguf) as backend:
        pass
    assert not (await backend.health()).healthy
    (result,) = await backend.infer([CompletionRequest("hi", GREEDY)])
    assert isinstance(result, BackendError)
