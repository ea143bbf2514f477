"""The configuration half of ``BackendConformance``: attributes, hooks, loading the backend."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from modelyard.core.backend import Backend, LoadContext
from modelyard.core.plugins import PluginHost
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationParams,
    InferenceRequest,
    Task,
    TensorRequest,
)
from modelyard.testing.conformance._common import (
    BackendPlugin,
    ConformanceError,
    check_options_type,
    host_for_entry_point,
    provided_by,
    run_async,
)
from modelyard.testing.conformance._results import check_results

__all__ = ["GARBAGE", "BackendSetup", "cap_of", "for_tasks", "pick_backend"]

_F = TypeVar("_F", bound=Callable[..., Any])
#: Bytes that are no model in any format: the kit's corrupt source.
GARBAGE = b"\x00\xffthis is not a model\n" * 64


def for_tasks(*tasks: Task) -> Callable[[_F], _F]:
    """Mark a check that only applies to some tasks; the others show as skipped."""

    def mark(fn: _F) -> _F:
        fn._conformance_tasks = frozenset(tasks)  # type: ignore[attr-defined]
        return fn

    return mark


class BackendSetup:
    """What a ``BackendConformance`` subclass configures, and how the checks reach the backend."""

    #: The entry point in the ``modelyard`` group, found exactly as the server finds it.
    entry_point: ClassVar[str | None] = None
    #: The Backend subclass or its ``name``; None: the one backend the entry point registers.
    backend: ClassVar[type[Backend] | str | None] = None
    #: Tasks to check; each must be among the backend's ``tasks``.
    tasks: ClassVar[Sequence[Task]] = ()
    #: The model loaded for every task (or override the ``model_source`` fixture).
    source: ClassVar[str | Path | None] = None
    #: ``[models.options]`` for every task (or override ``options_for``).
    options: ClassVar[Mapping[str, Any]] = {}
    #: The embedding width the model must return, when known.
    embedding_dim: ClassVar[int | None] = None
    #: The most any one check may take (load, a batch, a stream, the HTTP round trips).
    timeout_s: ClassVar[float] = 60.0
    #: ``infer`` may hold the event loop this long without awaiting ...
    loop_block_ms: ClassVar[float] = 50.0
    #: ... plus this much for a loaded CI machine.
    loop_block_tolerance_ms: ClassVar[float] = 50.0
    #: ``max_tokens`` of generation requests.
    max_tokens: ClassVar[int] = 8
    #: Texts the requests are made of.
    texts: ClassVar[Sequence[str]] = (
        "hello world", "the cat sat on the mat", "one two three", "a dog ran in the sea",
    )
    #: The batch-cap check sends at most this many requests in one batch.
    batch_probe_limit: ClassVar[int] = 64
    #: The same request always gets the same answer (greedy at temperature 0): the order check
    #: then compares each answer in a batch with the answer to the same request sent alone.
    deterministic: ClassVar[bool] = True
    #: Tensor task: every output's first axis has as many rows as the inputs' first axis.
    tensor_rows_follow_inputs: ClassVar[bool] = True

    # -- what an author may override ------------------------------------------------------

    def options_for(self, task: Task) -> Mapping[str, Any]:
        """The options table the model of ``task`` is loaded with."""
        return self.options

    def make_request(self, task: Task, index: int) -> InferenceRequest:
        """Request ``index`` of a batch; requests differ so that their order shows."""
        text = self.texts[index % len(self.texts)]
        if index >= len(self.texts):
            text = f"{text} {index}"
        params = GenerationParams(max_tokens=self.max_tokens, temperature=0.0)
        if task == Task.CHAT:
            return ChatRequest((ChatMessage("user", text),), params)
        if task == Task.COMPLETION:
            return CompletionRequest(text, params)
        # 1, 2, 3 inputs in turn: one row per input must hold whatever the count.
        inputs = tuple(
            self.texts[(index + k) % len(self.texts)] for k in range(index % 3 + 1)
        )
        if task == Task.EMBEDDINGS:
            return EmbeddingRequest(inputs)
        if task == Task.CLASSIFICATION:
            return ClassificationRequest(inputs)
        return self.tensor_request(index)

    def tensor_request(self, index: int) -> TensorRequest:
        """Tensor task: request ``index`` for the model under test. Override."""
        raise ConformanceError(
            "the tensor task needs inputs the model takes: override tensor_request(index)"
        )

    def make_corrupt_source(self, source: Path, directory: Path) -> Path | None:
        """A source that looks like ``source`` but holds garbage; None skips the check.

        A file becomes a file of the same name; a directory, one with the same file names.
        """
        target = directory / (source.name or "model")
        if source.is_dir():
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    copy = target / path.relative_to(source)
                    copy.parent.mkdir(parents=True, exist_ok=True)
                    copy.write_bytes(GARBAGE)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(GARBAGE)
        return target

    @pytest.fixture
    def model_source(self, task: Task) -> Path:
        """The model the checks of ``task`` load; override this fixture to build one."""
        if self.source is None:
            raise ConformanceError("set source (a model path) or override the model_source fixture")
        return Path(self.source)

    # -- collection -----------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "task" not in metafunc.fixturenames:
            return
        applies = getattr(metafunc.function, "_conformance_tasks", None)
        params = []
        for task in self.tasks:
            task = Task(task)
            marks = []
            if applies is not None and task not in applies:
                names = " and ".join(sorted(t.value for t in applies))
                marks.append(pytest.mark.skip(reason=f"applies to {names} only"))
            params.append(pytest.param(task, id=task.value, marks=marks))
        metafunc.parametrize("task", params)

    # -- the backend ----------------------------------------------------------------------

    def backend_class(self) -> type[Backend]:
        """The class under test: given directly, or what the entry point registers."""
        if isinstance(self.backend, type):
            return self.backend
        found: type[Backend] | None = self.__dict__.get("_backend_class")
        if found is None:
            if self.entry_point is None:
                raise ConformanceError(
                    "set entry_point (the name under [project.entry-points.modelyard]) or "
                    "backend (the Backend subclass)"
                )
            host = host_for_entry_point(self.entry_point)
            found = pick_backend(host, self.entry_point, self.backend)
            self.__dict__["_backend_class"] = found
        return found

    def plugin_host(self) -> PluginHost:
        """A PluginHost that provides the backend, through its entry point when there is one."""
        if self.entry_point is not None:
            return host_for_entry_point(self.entry_point)
        host = PluginHost(allow=())
        host.register(BackendPlugin(self.backend_class()), name="conformance")
        return host

    def load_context(self, task: Task, source: Path) -> LoadContext:
        cls = self.backend_class()
        options = check_options_type(f"backend {cls.name!r}", cls.options_type,
                                     self.options_for(task))
        return LoadContext(
            model="conformance", version="1", task=task, source=str(source), path=source,
            options=options,
        )

    @contextlib.asynccontextmanager
    async def loaded(self, task: Task, source: Path) -> AsyncIterator[Backend]:
        """A loaded backend for ``task``, unloaded afterwards."""
        backend = self.backend_class()(self.load_context(task, source))
        await backend.load()
        try:
            yield backend
        finally:
            await backend.unload()

    def _run(self, what: str, check: Callable[[], Awaitable[None]]) -> None:
        run_async(check(), timeout_s=self.timeout_s, what=what)

    def _with_backend(
        self, what: str, task: Task, source: Path, check: Callable[[Backend], Awaitable[None]]
    ) -> None:
        async def run() -> None:
            async with self.loaded(task, source) as backend:
                await check(backend)

        self._run(what, run)

    def _check(self, task: Task, batch: Sequence[InferenceRequest], results: Any) -> None:
        check_results(
            task, batch, results, embedding_dim=self.embedding_dim,
            tensor_rows_follow_inputs=self.tensor_rows_follow_inputs,
        )


def pick_backend(
    host: PluginHost, entry_point: str, wanted: type[Backend] | str | None
) -> type[Backend]:
    """The backend class the plugin behind ``entry_point`` registers as ``wanted``."""
    names = provided_by(host, entry_point, "backends")
    if isinstance(wanted, type):
        wanted = wanted.name
    if wanted is None:
        if len(names) != 1:
            raise ConformanceError(
                f"entry point {entry_point!r} registers {len(names)} backends "
                f"({', '.join(names) or 'none'}); set backend to the one to check"
            )
        wanted = names[0]
    if wanted not in names:
        raise ConformanceError(
            f"entry point {entry_point!r} does not register a backend named {wanted!r} "
            f"(it registers: {', '.join(names) or 'none'})"
        )
    return host.backends[wanted]


def cap_of(backend: Backend) -> int:
    cap = backend.max_batch_size
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 1:
        raise ConformanceError(
            f"max_batch_size is {cap!r}; it must be a positive int: the largest batch infer takes"
        )
    return cap
