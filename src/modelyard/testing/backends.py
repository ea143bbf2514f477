"""Fake backends for tests and demos: no model files, deterministic answers."""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import AsyncIterator, Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from modelyard.core.backend import Backend, BackendInfo
from modelyard.core.errors import BackendError, BadRequestError
from modelyard.core.types import (
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
    StreamChunk,
    Task,
    Tensor,
    TensorRequest,
    TensorResult,
    TensorSpec,
)

__all__ = [
    "CountingBackend",
    "EchoBackend",
    "EchoOptions",
    "FailingBackend",
    "HangingBackend",
    "SlowBackend",
    "StuckBackend",
]

ALL_TASKS = frozenset(Task)


class EchoOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    #: Embedding width.
    dim: Annotated[int, Meta(ge=1, le=4096)] = 8
    #: Largest batch accepted by ``infer``.
    max_batch_size: Annotated[int, Meta(ge=1)] = 64
    #: Seconds each call takes (SlowBackend) — a real sleep, the cost being modelled.
    delay_s: Annotated[float, Meta(ge=0)] = 0.0
    #: Extra seconds per batch item (SlowBackend).
    per_item_s: Annotated[float, Meta(ge=0)] = 0.0
    labels: list[str] = msgspec.field(default_factory=lambda: ["negative", "positive"])
    #: FailingBackend: fail on load instead of on inference.
    fail_on_load: bool = False
    #: Mixed into each embedded text, so two versions of one model answer differently with
    #: the same signature (a swap test tells which version computed an answer).
    salt: str = ""


def _words(text: str) -> list[str]:
    return text.split()


def fake_embedding(text: str, dim: int) -> list[float]:
    """A deterministic unit vector derived from the text."""
    digest = hashlib.blake2b(text.encode(), digest_size=64).digest()
    raw = [((digest[i % 64] ^ (i * 31 % 256)) - 127.5) for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


class EchoBackend(Backend):
    """Answers every task by echoing its input; tensors come back doubled as OUTPUT0."""

    name = "echo"
    tasks = ALL_TASKS
    options_type = EchoOptions

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.max_batch_size = self.options.max_batch_size
        self.calls: list[int] = []

    def memory_bytes(self) -> int:
        """Fakes hold no weights (their ``source`` is often ``.``, not a model folder)."""
        return 0

    def info(self) -> BackendInfo:
        return BackendInfo(
            inputs=[TensorSpec("INPUT0", "FP32", (-1, -1))],
            outputs=[TensorSpec("OUTPUT0", "FP32", (-1, -1))],
            parameters={"fake": True},
            platform="echo",
        )

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.calls.append(len(batch))
        await self._cost(len(batch))
        return [self._answer(request) for request in batch]

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        result = self._answer(request)
        assert isinstance(result, GenerationResult)
        words = result.text.split(" ")
        for i, word in enumerate(words):
            await asyncio.sleep(0)
            piece = word if i == 0 else " " + word
            yield StreamChunk(text=piece)
        yield StreamChunk(
            text="", finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )

    async def _cost(self, n: int) -> None:
        delay = self.options.delay_s + self.options.per_item_s * n
        if delay > 0:
            await asyncio.sleep(delay)

    def _answer(self, request: InferenceRequest) -> InferenceResult:
        if isinstance(request, ChatRequest):
            prompt = " ".join(m.content for m in request.messages)
            return self._generate(request.messages[-1].content, prompt, request.params.max_tokens,
                                  request.params.stop)
        if isinstance(request, CompletionRequest):
            return self._generate(request.prompt, request.prompt, request.params.max_tokens,
                                  request.params.stop)
        if isinstance(request, EmbeddingRequest):
            return EmbeddingResult(
                embeddings=[
                    fake_embedding(self.options.salt + t, self.options.dim)
                    for t in request.inputs
                ],
                prompt_tokens=sum(len(_words(t)) for t in request.inputs),
            )
        if isinstance(request, ClassificationRequest):
            labels = self.options.labels
            results = []
            for text in request.inputs:
                first = len(text) % len(labels)
                ranked = [Label(labels[first], 0.9)] + [
                    Label(lbl, 0.1 / max(1, len(labels) - 1))
                    for lbl in labels
                    if lbl != labels[first]
                ]
                results.append(ranked[: request.top_k] if request.top_k else ranked)
            return ClassificationResult(labels=results)
        if isinstance(request, TensorRequest):
            return self._tensor(request)
        raise BadRequestError(f"echo cannot serve {type(request).__name__}")

    @staticmethod
    def _generate(
        text: str, prompt: str, max_tokens: int | None, stop: Sequence[str]
    ) -> GenerationResult:
        words = _words(text)
        finish: Any = "stop"
        if max_tokens is not None and len(words) > max_tokens:
            words, finish = words[:max_tokens], "length"
        out = " ".join(words)
        for s in stop:
            cut = out.find(s)
            if cut >= 0:
                out, finish = out[:cut], "stop"
        return GenerationResult(
            text=out, finish_reason=finish, prompt_tokens=len(_words(prompt)),
            completion_tokens=len(_words(out)),
        )

    @staticmethod
    def _tensor(request: TensorRequest) -> TensorResult:
        by_name = {t.name: t for t in request.inputs}
        source = by_name.get("INPUT0")
        if source is None:
            raise BadRequestError("input tensor 'INPUT0' is missing")
        if source.datatype != "FP32":
            raise BadRequestError(
                f"input tensor 'INPUT0' has datatype {source.datatype}, expected FP32"
            )
        if len(source.shape) != 2:
            raise BadRequestError(
                f"input tensor 'INPUT0' has shape {list(source.shape)}, expected 2 dimensions"
            )
        data = [float(x) * 2.0 for x in source.data]
        out = Tensor("OUTPUT0", "FP32", source.shape, data)
        if request.outputs and "OUTPUT0" not in request.outputs:
            raise BadRequestError(f"unknown output tensor(s): {', '.join(request.outputs)}")
        return TensorResult(outputs=[out])


class SlowBackend(EchoBackend):
    """An echo whose every call costs ``delay_s + per_item_s * batch`` seconds."""

    name = "slow"


class FailingBackend(EchoBackend):
    """Fails every call (or its load, with ``fail_on_load``)."""

    name = "failing"

    async def load(self) -> None:
        if self.options.fail_on_load:
            raise BackendError("failing backend refused to load")

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.calls.append(len(batch))
        raise RuntimeError("failing backend always fails")

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        raise RuntimeError("failing backend always fails")
        yield  # pragma: no cover - makes this an async generator


class HangingBackend(EchoBackend):
    """Never answers: for timeouts, cancellation and drain tests."""

    name = "hanging"

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.release = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def load(self) -> None:
        self._loop = asyncio.get_running_loop()

    def open_gate(self) -> None:
        """Let every waiting call finish; safe to call from any thread (e.g. a test's)."""
        if self._loop is None:
            self.release.set()
        else:
            self._loop.call_soon_threadsafe(self.release.set)

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.calls.append(len(batch))
        await self.release.wait()
        return [self._answer(r) for r in batch]

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        await self.release.wait()
        yield StreamChunk(text="", finish_reason="stop")



class StuckBackend(HangingBackend):
    """A call that cannot be interrupted (a native call in a thread): cancelling does nothing
    until ``open_gate``; for the engine's stuck-call handling."""

    name = "stuck"

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        #: Cancellations the call shrugged off.
        self.ignored_cancels = 0

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.calls.append(len(batch))
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.ignored_cancels += 1
        return [self._answer(r) for r in batch]

class CountingBackend(EchoBackend):
    """An echo that records every batch size it was given in ``calls`` (per instance)."""

    name = "counting"

