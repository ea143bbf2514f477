"""``BackendConformance``: the contract every backend plugin keeps, as tests to subclass."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from modelyard.core.backend import Backend
from modelyard.core.batching import Batcher
from modelyard.core.errors import ModelLoadError
from modelyard.core.types import InferenceRequest, InferenceResult, StreamChunk, Task
from modelyard.testing.conformance._backend_setup import (
    BackendSetup,
    cap_of,
    for_tasks,
    pick_backend,
)
from modelyard.testing.conformance._common import (
    ConformanceError,
    check_options_type,
    host_for_entry_point,
)
from modelyard.testing.conformance._http import HttpCheck, check_over_http
from modelyard.testing.conformance._loop import largest_loop_gap
from modelyard.testing.conformance._results import (
    check_health,
    check_info,
    check_same_order,
    check_stream,
)

__all__ = ["BackendConformance"]

_GENERATION = (Task.CHAT, Task.COMPLETION)


class BackendConformance(BackendSetup):
    """The backend contract as pytest tests: subclass it as ``Test...`` and configure it.

    Each check runs once per task in ``tasks``. Set ``entry_point`` (the name under
    ``[project.entry-points.modelyard]``) and ``source`` (the model to load), or override the
    ``model_source`` fixture to build one per task. A failure says what is wrong in plain
    words. Checks that do not apply to a task (streams for embeddings) are skipped.
    """

    # -- the checks -----------------------------------------------------------------------

    def test_entry_point_is_found(self) -> None:
        if self.entry_point is None:
            pytest.skip("entry_point is not set: the server would not find this plugin")
        host = host_for_entry_point(self.entry_point)
        cls = pick_backend(host, self.entry_point, self.backend)
        if isinstance(self.backend, type) and cls is not self.backend:
            raise ConformanceError(
                f"entry point {self.entry_point!r} registers {cls.__qualname__} as "
                f"{cls.name!r}, not {self.backend.__qualname__}"
            )

    def test_declares_its_tasks(self) -> None:
        cls = self.backend_class()
        if not self.tasks:
            raise ConformanceError("set tasks: the tasks this backend is checked for")
        missing = [Task(t).value for t in self.tasks if Task(t) not in cls.tasks]
        if missing:
            raise ConformanceError(
                f"backend {cls.name!r} does not declare {', '.join(missing)} in tasks "
                f"({', '.join(sorted(cls.tasks)) or 'none'})"
            )

    def test_options_reject_unknown_fields(self) -> None:
        cls = self.backend_class()
        for task in self.tasks:
            check_options_type(f"backend {cls.name!r}", cls.options_type, self.options_for(task))

    def test_load_of_a_missing_source_raises_model_load_error(
        self, task: Task, model_source: Path, tmp_path: Path
    ) -> None:
        missing = tmp_path / "missing" / (model_source.name or "model")
        self._expect_load_error(task, missing, "a missing source")

    def test_load_of_a_corrupt_source_raises_model_load_error(
        self, task: Task, model_source: Path, tmp_path: Path
    ) -> None:
        corrupt = self.make_corrupt_source(model_source, tmp_path / "corrupt")
        if corrupt is None:
            pytest.skip("make_corrupt_source returned None")
        self._expect_load_error(task, corrupt, "a corrupt source")

    def _expect_load_error(self, task: Task, path: Path, what: str) -> None:
        async def load() -> None:
            backend = self.backend_class()(self.load_context(task, path))
            try:
                await backend.load()
            except ModelLoadError:
                return
            except Exception as exc:  # noqa: BLE001 - the wrong error is the finding
                raise ConformanceError(
                    f"loading {what} ({path}) raised {type(exc).__name__}: {exc}; load must "
                    "raise ModelLoadError, whose message the server shows as the reason"
                ) from exc
            finally:
                with contextlib.suppress(Exception):
                    await backend.unload()
            raise ConformanceError(
                f"loading {what} ({path}) succeeded; load must raise ModelLoadError"
            )

        self._run(f"loading {what}", load)

    def test_results_come_back_one_per_request_in_order(
        self, task: Task, model_source: Path
    ) -> None:
        async def check(backend: Backend) -> None:
            size = max(1, min(cap_of(backend), 3))
            batch = [self.make_request(task, i) for i in range(size)]
            together = await backend.infer(batch)
            self._check(task, batch, together)
            if self.deterministic:
                alone = []
                for request in batch:
                    answer = await backend.infer([request])
                    self._check(task, [request], answer)
                    alone.append(answer[0])
                check_same_order(together, alone)

        self._with_backend("infer", task, model_source, check)

    def test_max_batch_size_is_honoured(self, task: Task, model_source: Path) -> None:
        async def check(backend: Backend) -> None:
            cap = cap_of(backend)
            probe = min(cap, self.batch_probe_limit)
            batch = [self.make_request(task, i) for i in range(probe)]
            failed: BaseException | None
            try:
                results = await backend.infer(batch)
                failed = next((r for r in results if isinstance(r, BaseException)), None)
            except Exception as exc:  # noqa: BLE001 - the failure is the finding
                failed = exc
            if failed is not None:
                raise ConformanceError(
                    f"max_batch_size exceeded: the backend declares max_batch_size = {cap} but "
                    f"failed a batch of {probe}: {type(failed).__name__}: {failed}; declare the "
                    "largest batch infer can take"
                )
            self._check(task, batch, results)
            await self._through_the_batcher(backend, task, cap, 2 * probe + 1)

        self._with_backend("a batch of max_batch_size", task, model_source, check)

    async def _through_the_batcher(
        self, backend: Backend, task: Task, cap: int, count: int
    ) -> None:
        """Requests queued through the engine's batcher reach infer ``cap`` at a time at most."""
        sizes: list[int] = []
        infer = backend.infer

        async def recording(batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
            sizes.append(len(batch))
            return await infer(batch)

        backend.infer = recording  # type: ignore[method-assign]
        batcher = Batcher(
            backend, max_batch_size=cap, max_queue_delay_s=0.0, max_queue_size=count,
            concurrency=backend.concurrent_batches,
        )
        batcher.start()
        try:
            answers = await asyncio.gather(
                *(batcher.submit(self.make_request(task, i)) for i in range(count)),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()
            del backend.infer
        if max(sizes, default=0) > cap or cap_of(backend) != cap:
            raise ConformanceError(
                f"max_batch_size exceeded: infer got a batch of {max(sizes)} while the backend "
                f"declared max_batch_size = {cap} (now {backend.max_batch_size}); it must not "
                "change once loaded"
            )
        failed = [a for a in answers if isinstance(a, BaseException)]
        if failed:
            raise ConformanceError(
                f"{len(failed)} of {count} requests queued through the batcher failed: "
                f"{type(failed[0]).__name__}: {failed[0]}"
            )

    @for_tasks(*_GENERATION)
    def test_stream_ends_with_finish_reason_and_token_counts(
        self, task: Task, model_source: Path
    ) -> None:
        async def check(backend: Backend) -> None:
            _check_streams(backend)
            request = self.make_request(task, 0)
            chunks = [chunk async for chunk in backend.stream(request)]
            check_stream(chunks, self.max_tokens)

        self._with_backend("a stream", task, model_source, check)

    @for_tasks(*_GENERATION)
    def test_closing_a_stream_early_frees_its_slot(self, task: Task, model_source: Path) -> None:
        async def check(backend: Backend) -> None:
            _check_streams(backend)
            slots = min(cap_of(backend), 8)
            opened = [backend.stream(self.make_request(task, i)) for i in range(slots)]
            for stream in opened:
                await anext(aiter(stream))
            for stream in opened:
                close = getattr(stream, "aclose", None)
                if close is None:
                    raise ConformanceError(
                        "stream() returned an iterator without aclose(); return an async "
                        "generator so that a client that goes away frees its slot"
                    )
                await close()
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(self._drain(backend, task, i) for i in range(slots))),
                    timeout=self.timeout_s / 2,
                )
            except TimeoutError:
                raise ConformanceError(
                    f"after {slots} streams were closed after their first chunk, {slots} new "
                    f"streams did not finish within {self.timeout_s / 2:g} s: closing a stream "
                    "early does not free its slot"
                ) from None

        self._with_backend("streams closed early", task, model_source, check)

    async def _drain(self, backend: Backend, task: Task, index: int) -> list[StreamChunk]:
        chunks = [chunk async for chunk in backend.stream(self.make_request(task, index))]
        check_stream(chunks, self.max_tokens)
        return chunks

    def test_unload_is_idempotent(self, task: Task, model_source: Path) -> None:
        async def check() -> None:
            backend = self.backend_class()(self.load_context(task, model_source))
            await backend.load()
            await backend.unload()
            try:
                await backend.unload()
            except Exception as exc:  # noqa: BLE001 - the failure is the finding
                raise ConformanceError(
                    f"a second unload raised {type(exc).__name__}: {exc}; unload must be "
                    "idempotent (the server may unload a version twice while swapping)"
                ) from exc

        self._run("load and unload twice", check)

    def test_health_and_info_are_well_formed(self, task: Task, model_source: Path) -> None:
        async def check(backend: Backend) -> None:
            check_health(await backend.health())
            check_info(backend.info())

        self._with_backend("health and info", task, model_source, check)

    def test_infer_does_not_block_the_event_loop(self, task: Task, model_source: Path) -> None:
        limit = (self.loop_block_ms + self.loop_block_tolerance_ms) / 1000.0

        async def check(backend: Backend) -> None:
            batch = [self.make_request(task, i) for i in range(max(1, min(cap_of(backend), 4)))]
            await backend.infer(batch)  # warm up: a first call may build caches
            gaps = []
            for _ in range(3):  # a real block repeats; a hiccup of a busy machine does not
                gaps.append(await largest_loop_gap(lambda: backend.infer(batch)))
                if gaps[-1] <= limit:
                    return
            raise ConformanceError(
                f"infer blocked the event loop for {min(gaps) * 1000:.0f} ms (limit "
                f"{self.loop_block_ms:g} ms + {self.loop_block_tolerance_ms:g} ms tolerance); "
                "run blocking work in a thread (asyncio.to_thread) or in the runtime's own "
                "threads"
            )

        self._with_backend("infer beside a ticker", task, model_source, check)

    def test_serves_its_task_over_http(
        self, task: Task, model_source: Path, tmp_path: Path
    ) -> None:
        pytest.importorskip("openai", reason="install modelyard[test] for the openai SDK")
        pytest.importorskip("tritonclient.http", reason="install modelyard[test] (tritonclient)")
        check_over_http(
            HttpCheck(
                plugins=self.plugin_host(), backend=self.backend_class().name, task=task,
                source=model_source.resolve(), options=self.options_for(task),
                cache_dir=tmp_path / "cache", timeout_s=self.timeout_s, texts=self.texts,
                max_tokens=self.max_tokens, embedding_dim=self.embedding_dim,
                tensor_request=self.tensor_request(0) if task == Task.TENSOR else None,
            )
        )


def _check_streams(backend: Backend) -> None:
    if not backend.supports_streaming:
        raise ConformanceError(
            f"backend {backend.name!r} serves {backend.task} but does not override stream(); "
            "generation backends stream (the last chunk carries finish_reason)"
        )
