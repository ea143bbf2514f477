"""``GGUFBackend``: chat, completion and embeddings from a GGUF file through llama.cpp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from modelyard.backends.llamacpp.engine import Engine, Generation
from modelyard.backends.llamacpp.header import GGUFHeader, read_header
from modelyard.backends.llamacpp.options import GGUFOptions
from modelyard.backends.llamacpp.runtime import LlamaRuntime
from modelyard.backends.llamacpp.templates import (
    BUILTIN_CHAT_FORMATS,
    ChatTemplate,
    TemplateInputError,
    TemplateLimitError,
    TemplateOverrunError,
    TemplateRefusedError,
)
from modelyard.core.backend import Backend, BackendInfo, HealthReport, LoadContext, files_size
from modelyard.core.errors import (
    BackendError,
    BadRequestError,
    ModelLoadError,
    ModelyardError,
    UnsupportedTaskError,
)
from modelyard.core.types import ChatMessage as _ChatMessage
from modelyard.core.types import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    StreamChunk,
    Task,
    TensorSpec,
)

__all__ = ["GGUFBackend"]


class GGUFBackend(Backend):
    """One GGUF model version: a llama.cpp context whose slots serve requests concurrently."""

    name = "gguf"
    tasks = frozenset({Task.CHAT, Task.COMPLETION, Task.EMBEDDINGS})
    options_type = GGUFOptions

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)
        self.options: GGUFOptions = context.options
        # Each request of a batch joins the continuous batch; one batch fills every slot.
        self.max_batch_size = self.options.parallel
        self.header: GGUFHeader | None = None
        self._runtime: LlamaRuntime | None = None
        self._engine: Engine | None = None
        self._template: ChatTemplate | None = None
        self._template_origin = ""

    # -- lifecycle -----------------------------------------------------------------------

    @classmethod
    def detect_task(cls, path: Path | None, options: Any) -> Task | None:
        if path is None:
            return None
        header = read_header(path)
        if header.is_embedding_model:
            return Task.EMBEDDINGS
        if header.chat_template or options.chat_format or options.chat_template:
            return Task.CHAT
        return Task.COMPLETION

    async def load(self) -> None:
        if self.context.path is None:
            raise ModelLoadError("the gguf backend needs a model file")
        header = await asyncio.to_thread(read_header, self.context.path)
        self.header = header
        runtime = await asyncio.to_thread(
            LlamaRuntime, Path(header.path), self.options,
            embeddings=self.task == Task.EMBEDDINGS,
        )
        try:
            if self.task in (Task.CHAT, Task.COMPLETION):
                self._template = self._chat_template(header, runtime)
            engine = Engine(
                runtime, max_queue=self.options.max_queue,
                prefill_chunk=self.options.prefill_chunk, normalize=self.options.normalize,
                prefix_cache=self.options.prefix_cache and self.task != Task.EMBEDDINGS,
                min_prefix_tokens=self.options.min_prefix_tokens,
            )
            engine.start()
        except BaseException:
            runtime.close()
            raise
        self._runtime, self._engine = runtime, engine

    def _chat_template(self, header: GGUFHeader, runtime: LlamaRuntime) -> ChatTemplate | None:
        opts = self.options
        if opts.chat_template is not None:
            source, self._template_origin = opts.chat_template, "options.chat_template"
        elif opts.chat_format is not None:
            source = BUILTIN_CHAT_FORMATS[opts.chat_format]
            self._template_origin = f"chat_format {opts.chat_format}"
        elif header.chat_template is not None:
            source, self._template_origin = header.chat_template, "gguf file"
        elif self.task == Task.CHAT:
            raise ModelLoadError(
                f"{Path(header.path).name} has no chat template; set options.chat_format "
                f"({', '.join(BUILTIN_CHAT_FORMATS)}) or options.chat_template, or serve it "
                "with task = \"completion\""
            )
        else:
            return None
        try:
            return ChatTemplate(
                source,
                bos_token=runtime.token_text(runtime.special_token("bos")),
                eos_token=runtime.token_text(runtime.special_token("eos")),
                timeout_s=opts.template_timeout_s,
                max_chars=opts.template_max_chars,
            )
        except ValueError as exc:
            if self.task == Task.CHAT:
                raise ModelLoadError(f"{self._template_origin}: {exc}") from None
            return None  # a completion model does not need its broken template

    async def unload(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stop()  # the engine thread frees llama.cpp on its way out
        self._runtime = None

    def memory_bytes(self) -> int:
        """The weights (llama.cpp's tensor total, at least the file's size) plus the KV cache
        of every slot's context."""
        runtime, header = self._runtime, self.header
        if runtime is None or header is None:
            return super().memory_bytes()
        weights = max(files_size(Path(header.path)), runtime.weights_bytes)
        return weights + runtime.kv_cache_bytes

    async def health(self) -> HealthReport:
        if self._engine is None or not self._engine.alive:
            return HealthReport(healthy=False, detail="llama.cpp engine is not running")
        return HealthReport(healthy=True)

    def info(self) -> BackendInfo:
        header, runtime, engine = self.header, self._runtime, self._engine
        if header is None or runtime is None or engine is None:
            return BackendInfo(platform="llama.cpp")
        outputs = (
            [TensorSpec("embedding", "FP32", (-1, runtime.n_embd))]
            if self.task == Task.EMBEDDINGS else [TensorSpec("text", "BYTES", (-1,))]
        )
        parameters: dict[str, Any] = {
            "architecture": header.architecture,
            "quantization": header.quantization,
            "gguf_version": header.version,
            "context_length_trained": header.context_length,
            "context_per_slot": runtime.n_ctx_seq,
            "slots": runtime.n_seq_max,
            "max_queue": engine.capacity - runtime.n_seq_max,
            "device": runtime.device(),
            "gpu_layers": runtime.offloaded_layers(),
            "threads": runtime.threads,
            "llama_cpp_python": _llama_cpp_version(),
        }
        if self._template is not None:
            parameters["chat_template"] = self._template_origin
        if engine.slots.prefix_cache:
            stats = engine.prefix_cache_stats()
            parameters["prefix_cache"] = {
                "min_prefix_tokens": engine.slots.min_prefix_tokens,
                **msgspec.structs.asdict(stats),
            }
        return BackendInfo(
            inputs=[TensorSpec("text", "BYTES", (-1,))], outputs=outputs,
            parameters=parameters, platform="llama.cpp",
        )

    def counters(self) -> dict[str, int]:
        """Totals since load for a metrics scrape: requests, prefix-cache hits, tokens reused."""
        if self._engine is None or not self._engine.slots.prefix_cache:
            return {}
        stats = self._engine.prefix_cache_stats()
        return {
            "prefix_cache_requests": stats.requests,
            "prefix_cache_hits": stats.hits,
            "prefix_cache_tokens_reused": stats.tokens_reused,
            "prefix_cache_prompt_tokens": stats.prompt_tokens,
        }

    # -- inference -----------------------------------------------------------------------

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        results = await asyncio.gather(*(self._answer(r) for r in batch), return_exceptions=True)
        return [_as_result(r) for r in results]

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        generation = await self._start(request)
        try:
            async for chunk in generation.chunks():
                yield chunk
        finally:
            # The API closes this generator when the client disconnects: free the slot now.
            generation.close()

    async def _answer(self, request: InferenceRequest) -> InferenceResult:
        if isinstance(request, EmbeddingRequest):
            return await self._embed(request)
        generation = await self._start(request)
        parts: list[str] = []
        async for chunk in generation.chunks():
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                return GenerationResult(
                    text="".join(parts), finish_reason=chunk.finish_reason,
                    prompt_tokens=chunk.prompt_tokens or 0,
                    completion_tokens=chunk.completion_tokens or 0,
                )
        raise BackendError("generation ended without a finish reason")

    async def _start(self, request: InferenceRequest) -> Generation:
        engine, runtime = self._running()
        if isinstance(request, ChatRequest):
            prompt = await asyncio.to_thread(self._chat_tokens, request.messages)
        elif isinstance(request, CompletionRequest):
            prompt = await asyncio.to_thread(runtime.tokenize, request.prompt, add_special=True)
        else:
            raise UnsupportedTaskError(
                f"the gguf backend cannot generate from {request.task.value}"
            )
        if not prompt:
            raise BadRequestError("prompt is empty")
        if len(prompt) > runtime.n_ctx_seq:
            raise BadRequestError(
                f"prompt is {len(prompt)} tokens; this model's context holds "
                f"{runtime.n_ctx_seq} per request"
            )
        self._check_params(request.params, runtime)
        max_tokens = request.params.max_tokens or runtime.n_ctx_seq
        return engine.submit(prompt, request.params, max_tokens)

    def _chat_tokens(self, messages: Sequence[_ChatMessage]) -> list[int]:
        runtime = self._running()[1]
        if self._template is None:
            raise UnsupportedTaskError(f"model {self.context.model!r} has no chat template")
        try:
            text = self._template.render(messages)
        except TemplateInputError as exc:
            raise BadRequestError(f"the chat template rejected the messages: {exc}") from None
        except TemplateOverrunError as exc:
            # The model file's template, not the conversation: a server-side failure that the
            # breaker counts and failover routes around (templates.py says who is to blame).
            raise BackendError(f"{self._template_origin}: {exc}") from None
        except TemplateLimitError as exc:
            raise BadRequestError(str(exc)) from None
        except TemplateRefusedError as exc:
            raise BackendError(f"{self._template_origin}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - TemplateError and whatever a template raises
            raise BackendError(f"{self._template_origin}: {exc}") from None
        # Templates that write the BOS token themselves must not get a second one.
        bos = self._template.bos_token
        add_bos = not (bos and text.startswith(bos))
        return runtime.tokenize(text, add_special=add_bos)

    @staticmethod
    def _check_params(params: GenerationParams, runtime: LlamaRuntime) -> None:
        for token in params.logit_bias or {}:
            if not 0 <= token < runtime.n_vocab:
                raise BadRequestError(
                    f"logit_bias: token id {token} is outside the vocabulary "
                    f"(0..{runtime.n_vocab - 1})"
                )

    async def _embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        engine, runtime = self._running()
        limit = min(runtime.n_ctx_seq, runtime.n_batch)
        tokenized = await asyncio.to_thread(
            lambda: [runtime.tokenize(text, add_special=True) for text in request.inputs]
        )
        truncated = sum(1 for tokens in tokenized if len(tokens) > limit)
        inputs = [tokens[:limit] or _fallback(runtime) for tokens in tokenized]
        vectors = await engine.embed(inputs)
        return EmbeddingResult(
            embeddings=vectors, prompt_tokens=sum(len(t) for t in inputs),
            truncated_inputs=truncated,
        )

    def _running(self) -> tuple[Engine, LlamaRuntime]:
        if self._engine is None or self._runtime is None:
            raise BackendError("model is not loaded")
        return self._engine, self._runtime


def _fallback(runtime: LlamaRuntime) -> list[int]:
    token = runtime.special_token("bos")
    if token is None:
        raise BadRequestError("an input is empty")
    return [token]


def _as_result(value: InferenceResult | BaseException) -> Any:
    if isinstance(value, ModelyardError | asyncio.CancelledError) or not isinstance(
        value, BaseException
    ):
        return value
    return BackendError(f"backend failed: {type(value).__name__}: {value}")


def _llama_cpp_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))
