"""``Telemetry``: the one object the core calls where something worth observing happens.

It bundles the app's :class:`~modelyard.core.metrics.Metrics` and
:class:`~modelyard.core.tracing.Tracing` and the request being served (``core.logs``), so the
service has one short call per event and none of the three leaks into its logic. Every hook
is cheap when nobody is looking: metrics go to children bound once per version, and spans
are only built when the request's span is recording.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace

from modelyard.core.logs import RequestInfo, current_request
from modelyard.core.metrics import Metrics
from modelyard.core.tracing import (
    AUTH_SPAN,
    BACKEND_SPAN,
    BATCH_SPAN,
    CACHE_SPAN,
    QUEUE_SPAN,
    Tracing,
)
from modelyard.core.types import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferenceRequest,
    InferenceResult,
    StreamChunk,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from modelyard.core.batching import BatchRun, BatchTiming
    from modelyard.core.failover import FailoverChain
    from modelyard.core.registry import ModelRegistry, ModelVersion

__all__ = ["Telemetry", "prompt_text"]

#: Longest prompt text an access line carries when ``log_prompts`` is on.
PROMPT_LOG_CHARS = 4096


class Telemetry:
    """Metrics, tracing and request context for one app (one service)."""

    def __init__(
        self,
        *,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        log_prompts: bool = False,
    ) -> None:
        self.metrics = metrics if metrics is not None else Metrics()
        self.tracing = tracing if tracing is not None else Tracing()
        self.log_prompts = log_prompts

    def watch(self, registry: ModelRegistry, aliases: Mapping[str, FailoverChain]) -> None:
        """Export the models' and aliases' state with every scrape."""
        self.metrics.watch(registry, aliases)

    async def aclose(self) -> None:
        """Flush the spans an owned exporter still holds (the app's lifespan calls this last)."""
        # Off the loop: the exporter may block on the network for its timeout.
        await asyncio.to_thread(self.tracing.shutdown)

    # -- model lifecycle ---------------------------------------------------------------------

    def model_loaded(self, version: ModelVersion, seconds: float) -> None:
        self.metrics.for_version(version).load_duration.observe(seconds)
        self.metrics.loads.labels(version.name, "loaded").inc()

    def model_load_failed(self, version: ModelVersion) -> None:
        self.metrics.loads.labels(version.name, "failed").inc()

    def model_evicted(self, version: ModelVersion, reason: str) -> None:
        """``reason``: ``idle`` (past its keep-alive) or ``budget`` (room for another load)."""
        self.metrics.evictions.labels(version.name, reason).inc()

    def load_waited(self, version: ModelVersion, seconds: float) -> None:
        """A request waited ``seconds`` for ``version``'s on-demand load (or gave up then)."""
        self.metrics.load_wait.labels(version.name).observe(seconds)

    def memory_limits(self, budget_bytes: int | None, max_loaded: int | None) -> None:
        self.metrics.memory_limits(budget_bytes, max_loaded)

    def swapped(self, model: str) -> None:
        self.metrics.model_swapped(model)

    def rolled_back(self, model: str, reason: str) -> None:
        self.metrics.model_rolled_back(model, reason)

    # -- inference ---------------------------------------------------------------------------

    def batch_observer(self, version: ModelVersion) -> Callable[[BatchRun], None]:
        """The batcher's per-batch callback: batch size and backend call duration."""
        bound = self.metrics.for_version(version)

        def observe(run: BatchRun) -> None:
            bound.batch(run.size, run.seconds)

        return observe

    def serving(self, version: ModelVersion, request: InferenceRequest) -> None:
        """The request is about to be served by ``version`` (the last one tried wins)."""
        info = current_request()
        if info is None:
            return
        info.model, info.version = version.name, version.version
        info.backend = version.spec.backend.name
        if self.log_prompts:
            info.prompt = prompt_text(request)

    def batched(self, version: ModelVersion, timing: BatchTiming) -> None:
        """A request left the batcher (answered or not): its queue wait and its spans."""
        if timing.queue_wait_s is not None:
            self.metrics.for_version(version).queue_wait.observe(timing.queue_wait_s)
        parent = trace.get_current_span()
        if not parent.is_recording() or not timing.enqueued_ns:
            return
        now = time.time_ns()
        attrs = {"modelyard.model": version.name, "modelyard.version": version.version}
        run = timing.batch
        if run is None:  # timed out, cancelled or unloaded while queued
            self.tracing.record(QUEUE_SPAN, timing.enqueued_ns, now, parent=parent,
                                attributes=attrs, error=True)
            return
        self.tracing.record(QUEUE_SPAN, timing.enqueued_ns, run.started_ns, parent=parent,
                            attributes=attrs)
        batch = self.tracing.record(
            BATCH_SPAN, run.started_ns, now, parent=parent,
            attributes={**attrs, "modelyard.batch.size": run.size}, error=run.failed,
        )
        if batch is None:
            return
        self.tracing.record(
            BACKEND_SPAN, run.started_ns, run.finished_ns or now, parent=batch,
            attributes={**attrs, "modelyard.backend": version.spec.backend.name}, error=run.failed,
        )

    def answered(self, version: ModelVersion, result: InferenceResult) -> None:
        """Token counts of a non-streamed result."""
        prompt = getattr(result, "prompt_tokens", None)
        completion = getattr(result, "completion_tokens", None)
        self.metrics.for_version(version).tokens(prompt, completion)
        info = current_request()
        if info is not None:
            info.add_tokens(prompt, completion)

    async def observe_stream(
        self, version: ModelVersion, chunks: AsyncIterator[StreamChunk]
    ) -> AsyncIterator[StreamChunk]:
        """``chunks`` as they come, timing the first text and the gaps between texts."""
        bound = self.metrics.for_version(version)
        info = current_request()
        parent = trace.get_current_span()
        started_ns, started = time.time_ns(), time.perf_counter()
        last: float | None = None
        final: StreamChunk | None = None
        failed = False
        try:
            async for chunk in chunks:
                if chunk.text:
                    now = time.perf_counter()
                    if last is None:
                        bound.time_to_first_token.observe(now - started)
                    else:
                        bound.inter_token.observe(now - last)
                    last = now
                if chunk.finish_reason is not None:
                    final = chunk
                yield chunk
        except Exception:
            failed = True
            raise
        finally:
            # Closing the backend's generator is how an abandoned stream frees its slot.
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
            self._stream_done(version, info, parent, started_ns, final, failed)

    def _stream_done(
        self, version: ModelVersion, info: RequestInfo | None, parent: Span, started_ns: int,
        final: StreamChunk | None, failed: bool,
    ) -> None:
        prompt = final.prompt_tokens if final is not None else None
        completion = final.completion_tokens if final is not None else None
        self.metrics.for_version(version).tokens(prompt, completion)
        if info is not None:
            info.add_tokens(prompt, completion)
        attrs: dict[str, str | int | bool] = {
            "modelyard.model": version.name, "modelyard.version": version.version,
            "modelyard.backend": version.spec.backend.name, "modelyard.streaming": True,
        }
        if completion is not None:
            attrs["gen_ai.usage.output_tokens"] = completion
        self.tracing.record(BACKEND_SPAN, started_ns, time.time_ns(), parent=parent,
                            attributes=attrs, error=failed)

    # -- hooks for the auth and cache layers ---------------------------------------------------

    @contextlib.contextmanager
    def auth_span(self) -> Iterator[Span]:
        """Wrap authentication in this; a child of the request span."""
        with self.tracing.span(AUTH_SPAN) as span:
            yield span

    @contextlib.contextmanager
    def cache_span(self) -> Iterator[Span]:
        """Wrap a cache lookup in this; record its outcome with :meth:`cache_result`."""
        with self.tracing.span(CACHE_SPAN) as span:
            yield span

    def cache_result(self, outcome: str) -> None:
        """``hit`` or ``miss`` for the current request (access line and request span)."""
        info = current_request()
        if info is not None:
            info.cache = outcome
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attribute("modelyard.cache.result", outcome)


def prompt_text(request: InferenceRequest) -> str | None:
    """The text a request carries, for ``log_prompts`` only; None for tensors."""
    if isinstance(request, ChatRequest):
        text = "\n".join(f"{m.role}: {m.content}" for m in request.messages)
    elif isinstance(request, CompletionRequest):
        text = request.prompt
    elif isinstance(request, EmbeddingRequest | ClassificationRequest):
        text = "\n".join(request.inputs)
    else:
        return None
    return text if len(text) <= PROMPT_LOG_CHARS else text[:PROMPT_LOG_CHARS] + "…"
