"""``OnnxBackend``: one onnxruntime session per model version, serving one task."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from modelyard.backends.onnx import providers as eps
from modelyard.backends.onnx.layout import ModelFiles, locate
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.backends.onnx.safety import GraphSummary, check_model_file
from modelyard.core.backend import Backend, BackendInfo, HealthReport, LoadContext
from modelyard.core.errors import ModelLoadError, ModelNotReadyError, UnsupportedTaskError
from modelyard.core.types import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferenceRequest,
    InferenceResult,
    StreamChunk,
    Task,
    TensorRequest,
)

__all__ = ["OnnxBackend"]

log = logging.getLogger("modelyard.backends.onnx")

_GENERATION = frozenset({Task.CHAT, Task.COMPLETION})
_REQUEST_TYPES: dict[Task, tuple[type, ...]] = {
    Task.TENSOR: (TensorRequest,),
    Task.EMBEDDINGS: (EmbeddingRequest,),
    Task.CLASSIFICATION: (ClassificationRequest,),
    Task.COMPLETION: (CompletionRequest,),
    Task.CHAT: (ChatRequest, CompletionRequest),
}
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_EMBEDDING_OUTPUTS = frozenset({"last_hidden_state", "token_embeddings", "sentence_embedding"})


class OnnxBackend(Backend):
    """Serves an ONNX graph (or an optimum export directory) with onnxruntime."""

    name = "onnx"
    tasks = frozenset(
        {Task.TENSOR, Task.EMBEDDINGS, Task.CLASSIFICATION, Task.COMPLETION, Task.CHAT}
    )
    options_type = OnnxOptions

    def __init__(self, context: LoadContext) -> None:
        super().__init__(context)
        self.options: OnnxOptions = context.options
        # Generations run one after another; batching them would only queue them inside infer.
        self.max_batch_size = 1 if self.task in _GENERATION else self.options.max_batch_size
        self._session: Any = None
        self._runner: Any = None
        #: Runs a batch that finds no other batch running, on every core (see ``wide_session``).
        self._wide_runner: Any = None
        #: Threads of their own for batch runs (see ``_run``); the wide runner gets one.
        self._threads: ThreadPoolExecutor | None = None
        self._wide_thread: ThreadPoolExecutor | None = None
        self._running = 0
        self._info = BackendInfo(platform="onnxruntime")

    # -- loading ---------------------------------------------------------------------------

    async def load(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        if self.context.path is None:
            raise ModelLoadError("the onnx backend needs a model path")
        files = locate(self.context.path, self.options.file)
        summary = check_model_file(files.model)
        task = self.task or Task.TENSOR
        layout = _RunLayout.plan(self.options, generation=task in _GENERATION)
        session, parameters = self._open_session(files, layout.first_threads, save=True)
        keep_wide = layout.settle(session.get_providers())
        wide = None
        if layout.narrow_threads != layout.first_threads:
            narrow, _ = self._open_session(
                files, layout.narrow_threads, session.get_providers(), save=False
            )
            session, wide = narrow, (session if keep_wide else None)
        runner, extra = _build_runner(task, session, files, self.options)
        wide_runner = None if wide is None else _build_runner(task, wide, files, self.options)[0]
        from modelyard.backends.onnx.tensor import spec_of

        self._session, self._runner, self._wide_runner = session, runner, wide_runner
        self.task, self.concurrent_batches = task, layout.runs
        name = f"onnx-{self.context.model}"
        self._threads = ThreadPoolExecutor(layout.runs, thread_name_prefix=name)
        if wide_runner is not None:
            self._wide_thread = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-wide")
        parameters["intra_op_threads"] = layout.narrow_threads or "auto"
        if wide is not None:
            parameters["wide_session_threads"] = layout.first_threads or "auto"
        self._info = BackendInfo(
            inputs=[spec_of(arg) for arg in session.get_inputs()],
            outputs=[spec_of(arg) for arg in session.get_outputs()],
            parameters=_compact(
                {
                    "task": task.value,
                    **parameters,
                    "model_file": files.model.name,
                    # Operators outside the standard set: worth seeing next to the providers.
                    "op_domains": sorted(summary.domains - {"", "ai.onnx"}),
                    "max_batch_size": self.max_batch_size,
                    "concurrent_runs": self.concurrent_batches,
                    **extra,
                }
            ),
            platform="onnxruntime",
        )

    def _open_session(
        self,
        files: ModelFiles,
        threads: int | None,
        providers: list[str] | None = None,
        *,
        save: bool,
    ) -> tuple[Any, dict[str, Any]]:
        """A session with ``threads`` intra-op threads on the configured providers (with
        fallback), or exactly on ``providers`` for a second session of the same version;
        ``save``: write ``optimized_model_path`` (once per version is enough)."""
        import onnxruntime as ort

        if providers is None:
            plan, warnings = eps.plan_providers(
                self.options.provider_list, ort.get_available_providers()
            )
        else:
            plan, warnings = list(providers), []
        session_options = _session_options(ort, self.options, files, threads, save=save)

        def open_session(providers: list[str]) -> Any:
            return ort.InferenceSession(
                str(files.model),
                sess_options=session_options,
                providers=providers,
                provider_options=[self.options.options_for(p) for p in providers],
            )

        try:
            session, failed = eps.open_with_fallback(plan, open_session)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
            raise ModelLoadError(
                f"onnxruntime cannot load {files.model.name}: {type(exc).__name__}: {exc}"
            ) from None
        active = list(session.get_providers())
        warnings += failed + eps.report_fallback(plan[:1], active)
        eps.warn(self.context.model, warnings)
        return session, {
            "providers": active,
            "requested_providers": self.options.provider_list or "auto",
            "provider_warnings": warnings,
            "graph_optimization": self.options.graph_optimization,
            "onnxruntime": ort.__version__,
        }

    async def unload(self) -> None:
        self._session = self._runner = self._wide_runner = None
        threads, self._threads = self._threads, None
        wide, self._wide_thread = self._wide_thread, None
        for pool in (threads, wide):
            if pool is not None:
                pool.shutdown(wait=False)  # a run still going ends on its own thread

    # -- serving ---------------------------------------------------------------------------

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        runner = self._ready()
        wanted = _REQUEST_TYPES.get(self.task or Task.TENSOR, ())
        wrong = [r for r in batch if not isinstance(r, wanted)]
        if wrong:
            raise UnsupportedTaskError(
                f"model {self.context.model!r} serves {self.task}, not {wrong[0].task}"
            )
        threads = self._threads
        if self._wide_runner is not None and self._running == 0:
            # The model is idle: every core for this batch. Batches that overlap it run on
            # the narrow session, each on its share of the cores.
            runner, threads = self._wide_runner, self._wide_thread
        return await self._run(runner, batch, threads)

    async def _run(
        self, runner: Any, batch: Sequence[InferenceRequest], threads: ThreadPoolExecutor | None
    ) -> list[InferenceResult]:
        """``runner.run(batch)`` on one of the version's own threads.

        Not ``asyncio.to_thread``: the shared default pool hands each call to whichever of
        its idle threads wakes first, while a small pool of our own keeps reusing the same
        warm threads; on a 2-core VM that took ~60 us off every batch's round trip.
        Cancelled, it still waits for a run that has started (see ``_outlast``).
        """
        if threads is None:  # unloaded
            raise ModelNotReadyError(f"model {self.context.model!r} is not loaded")
        self._running += 1
        try:
            call = contextvars.copy_context().run  # log lines keep the request's fields
            return await _outlast(threads.submit(call, runner.run, batch))
        finally:
            self._running -= 1

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        runner = self._ready()
        if self.task not in _GENERATION or not isinstance(request, ChatRequest | CompletionRequest):
            raise UnsupportedTaskError(
                f"model {self.context.model!r} does not stream {request.task}"
            )
        decoder = await asyncio.to_thread(runner.start, request)
        while decoder.finish is None:
            # One token per hop off the loop: closing this generator stops the decoding.
            piece = await asyncio.to_thread(decoder.step)
            if decoder.finish is not None:
                yield StreamChunk(
                    text=piece,
                    finish_reason=decoder.finish,
                    prompt_tokens=decoder.prompt_tokens,
                    completion_tokens=decoder.completion_tokens,
                )
            elif piece:
                yield StreamChunk(text=piece)

    def _ready(self) -> Any:
        if self._runner is None:
            raise ModelNotReadyError(f"model {self.context.model!r} is not loaded")
        return self._runner

    async def health(self) -> HealthReport:
        if self._session is None:
            return HealthReport(healthy=False, detail="no onnxruntime session")
        return HealthReport(healthy=True)

    def info(self) -> BackendInfo:
        return self._info

    def memory_bytes(self) -> int:
        """The graph file plus its external data files: the weights onnxruntime holds. The
        arena it grows while running is not measurable from Python, so this is a floor."""
        if self.context.path is None:
            return 0
        model = locate(self.context.path, self.options.file).model
        size = model.stat().st_size
        if size > 256 * 1024 * 1024:  # weights inside the graph: nothing external to add
            return size
        # A split model's graph file is small: reading it for its data files is cheap.
        external = check_model_file(model).external_locations
        return size + sum((model.parent / location).stat().st_size for location in external)

    @classmethod
    def detect_task(cls, path: Path | None, options: Any) -> Task | None:
        """Tell the task from config.json and the graph's inputs and outputs."""
        if path is None:
            return None
        files = locate(path, getattr(options, "file", "model.onnx"))
        return task_of(files, check_model_file(files.model))


async def _outlast(work: Future[list[InferenceResult]]) -> list[InferenceResult]:
    """The result of a run on a thread; a cancelled caller waits for a started run to return.

    A thread cannot be interrupted. Were the await given up at once, the batcher would take a
    run that is still inside onnxruntime for a finished call: it could not count it as stuck
    past ``stuck_after_s`` or turn the version unhealthy, and ``_running`` would let the next
    batch onto the wide session while this one still holds every core. So the cancellation
    is raised once the run has returned. A run still waiting for a thread is withdrawn.
    """
    running = asyncio.wrap_future(work)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if work.cancel():  # not started: it never runs
            raise
        while not running.done():
            with contextlib.suppress(asyncio.CancelledError):  # cancelled again: still running
                await asyncio.wait((running,))
        if not running.cancelled():
            running.exception()  # retrieved: nobody is left to hear how it ended
        raise


def task_of(files: ModelFiles, summary: GraphSummary) -> Task:
    """Decoder with past -> chat/completion; sequence classifier -> classification; an encoder
    with a tokenizer -> embeddings; anything else -> tensor."""
    config = files.config
    architectures = [str(a) for a in config.get("architectures") or []]
    texty = files.tokenizer_path is not None and "input_ids" in summary.inputs
    if not texty:
        return Task.TENSOR
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures)
    if causal or any(name.startswith("past_key_values.") for name in summary.inputs):
        return Task.CHAT if files.chat_template() and _has_jinja2() else Task.COMPLETION
    if any(a.endswith("ForSequenceClassification") for a in architectures) or (
        summary.outputs == ["logits"] and config.get("id2label")
    ):
        return Task.CLASSIFICATION
    if _EMBEDDING_OUTPUTS & set(summary.outputs):
        return Task.EMBEDDINGS
    return Task.TENSOR


def _has_jinja2() -> bool:
    return importlib.util.find_spec("jinja2") is not None


def _compact(parameters: dict[str, Any]) -> dict[str, Any]:
    """Drop empty entries: ``modelyard models --url`` prints every parameter on one line."""
    return {k: v for k, v in parameters.items() if v not in (None, [], {}, "")}


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


class _RunLayout:
    """How many batches run at once, and on which sessions with how many threads each.

    One session serves every run unless several single-core-ish runs share a CPU: then the
    runs go to a *narrow* session (the cores divided among the runs: no barrier between two
    batches, so the event loop taking a core slows one run, not all of them), and a *wide*
    session with every core serves a batch that finds the model otherwise idle.
    """

    MAX_AUTO_RUNS = 4

    def __init__(self, options: OnnxOptions, generation: bool, cores: int) -> None:
        self.options, self.generation, self.cores = options, generation, cores
        self.runs = 1
        #: Threads of the session opened first (None: onnxruntime's choice, every core).
        self.first_threads = options.intra_op_threads
        #: Threads of the session the concurrent runs share.
        self.narrow_threads = options.intra_op_threads
        runs = options.concurrent_runs
        if not generation and isinstance(runs, int) and runs > 1 and not options.wide_session:
            # Known before any session opens: open the narrow one directly.
            self.first_threads = self._narrow_threads(runs)

    @classmethod
    def plan(cls, options: OnnxOptions, *, generation: bool) -> _RunLayout:
        return cls(options, generation, usable_cores())

    def _narrow_threads(self, runs: int) -> int:
        return self.options.intra_op_threads or max(1, self.cores // runs)

    def settle(self, active: list[str]) -> bool:
        """Fix ``runs`` and ``narrow_threads`` once the first session's providers are known;
        True when the first session stays on as the wide one."""
        cpu_only = list(active) == ["CPUExecutionProvider"]
        self.runs = self._runs(cpu_only)
        self.narrow_threads = self.first_threads  # one session unless split below
        if self.runs < 2 or not cpu_only:
            return False
        self.narrow_threads = self._narrow_threads(self.runs)
        if self.narrow_threads == self.first_threads:
            return False  # the first session already is the narrow one: nothing wider
        return self.options.wide_session and self.narrow_threads < self.cores

    def _runs(self, cpu_only: bool) -> int:
        wanted = self.options.concurrent_runs
        if self.generation:
            return 1
        if wanted != "auto":
            return wanted
        if not cpu_only or self.cores < 2:
            return 1
        if self.options.intra_op_threads:
            return max(1, self.cores // self.options.intra_op_threads)
        return min(self.MAX_AUTO_RUNS, self.cores)


def _session_options(
    ort: Any, options: OnnxOptions, files: ModelFiles, threads: int | None, *, save: bool = True
) -> Any:
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[options.graph_optimization]
    so.log_severity_level = 3  # errors only: onnxruntime's warnings are not for API clients
    spin = "1" if options.spin_wait else "0"
    so.add_session_config_entry("session.intra_op.allow_spinning", spin)
    so.add_session_config_entry("session.inter_op.allow_spinning", spin)
    for key, value in options.session_config.items():
        so.add_session_config_entry(key, value)
    if threads is not None:
        so.intra_op_num_threads = threads
    if options.inter_op_threads is not None:
        so.inter_op_num_threads = options.inter_op_threads
        if options.inter_op_threads > 1:
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    if save and options.optimized_model_path:
        target = Path(options.optimized_model_path).expanduser()
        target = target if target.is_absolute() else files.root / target
        if target.resolve() == files.model.resolve():
            raise ModelLoadError("optimized_model_path must not overwrite the model file")
        so.optimized_model_filepath = str(target)
    return so


def _build_runner(
    task: Task, session: Any, files: ModelFiles, options: OnnxOptions
) -> tuple[Any, dict[str, Any]]:
    """The task object that turns core requests into session runs, plus what info() shows."""
    # Task modules import numpy and tokenizers; they load with the model, not the plugin.
    if task == Task.TENSOR:
        from modelyard.backends.onnx.tensor import TensorTask

        return TensorTask(session), {}
    if task in _GENERATION:
        from modelyard.backends.onnx.generation import GenerationTask

        runner = GenerationTask(session, files)
        if task == Task.CHAT and runner.chat_template is None:
            raise ModelLoadError("task chat needs a chat template in tokenizer_config.json")
        if task == Task.CHAT and not _has_jinja2():
            raise ModelLoadError("task chat renders its template with jinja2: pip install jinja2")
        return runner, {
            "context_length": runner.context,
            "chat_template": runner.chat_template is not None,
        }
    from modelyard.backends.onnx.text import TextEncoder

    graph_inputs = {arg.name: arg.type for arg in session.get_inputs()}
    encoder = TextEncoder(files, graph_inputs, files.max_length(options.max_length))
    if task == Task.EMBEDDINGS:
        from modelyard.backends.onnx.embeddings import EmbeddingTask

        embed = EmbeddingTask(
            session,
            encoder,
            pooling=options.pooling,
            normalize=options.normalize,
            rows_per_run=options.max_batch_size,
        )
        return embed, {
            "dimensions": embed.dimensions,
            "pooling": options.pooling,
            "normalize": options.normalize,
            "max_length": encoder.max_length,
            "output": embed.output,
        }
    from modelyard.backends.onnx.classification import ClassificationTask

    classify = ClassificationTask(
        session, encoder, files.config, rows_per_run=options.max_batch_size
    )
    return classify, {"labels": classify.labels, "max_length": encoder.max_length}
