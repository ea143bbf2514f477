"""How many batches run at once, on which session, with how many threads.

The layout is pure arithmetic over the options, the usable cores and the active providers;
the backend tests check that a batch finding the model idle reaches the wide session and that
overlapping batches share the narrow one.
"""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelyard.backends.onnx import backend as onnx_backend
from modelyard.backends.onnx.backend import OnnxBackend, _RunLayout
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.backend import LoadContext
from modelyard.core.types import EmbeddingRequest, Task

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _layout(
    cores: int, active: list[str] = CPU, *, generation: bool = False, **options: Any
) -> tuple[_RunLayout, bool]:
    layout = _RunLayout(msgspec.convert(options, OnnxOptions), generation, cores)
    return layout, layout.settle(active)


def test_auto_on_two_cores_runs_two_single_thread_batches_and_keeps_a_wide_session() -> None:
    layout, wide = _layout(2)
    assert (layout.runs, layout.first_threads, layout.narrow_threads, wide) == (2, None, 1, True)


def test_auto_caps_the_runs_and_splits_the_cores_among_them() -> None:
    layout, wide = _layout(16)
    assert (layout.runs, layout.narrow_threads, wide) == (4, 4, True)
    layout, wide = _layout(3)
    assert (layout.runs, layout.narrow_threads, wide) == (3, 1, True)


def test_auto_on_one_core_or_a_gpu_runs_one_batch_on_one_session() -> None:
    for layout, wide in (_layout(1), _layout(8, CUDA)):
        assert layout.runs == 1 and not wide
        assert layout.narrow_threads == layout.first_threads  # no second session


def test_generation_runs_one_batch_whatever_was_asked() -> None:
    layout, wide = _layout(8, generation=True, concurrent_runs=4)
    assert layout.runs == 1 and not wide and layout.narrow_threads == layout.first_threads


def test_explicit_threads_make_auto_fill_the_cores_on_one_session() -> None:
    layout, wide = _layout(8, intra_op_threads=2)
    assert (layout.runs, layout.first_threads, layout.narrow_threads, wide) == (4, 2, 2, False)


def test_one_run_asked_for_is_the_old_single_session() -> None:
    layout, wide = _layout(8, concurrent_runs=1)
    got = (layout.runs, layout.first_threads, layout.narrow_threads, wide)
    assert got == (1, None, None, False)


def test_without_the_wide_session_the_narrow_one_opens_first_and_alone() -> None:
    layout, wide = _layout(4, concurrent_runs=2, wide_session=False)
    assert (layout.runs, layout.first_threads, layout.narrow_threads, wide) == (2, 2, 2, False)


def test_explicit_runs_on_a_gpu_share_its_one_session() -> None:
    layout, wide = _layout(8, CUDA, concurrent_runs=3)
    assert layout.runs == 3 and not wide and layout.narrow_threads == layout.first_threads


# -- the backend picks the session ---------------------------------------------------------


async def _backend(path: Path, **options: Any) -> OnnxBackend:
    opts = msgspec.convert(options, OnnxOptions)
    backend = OnnxBackend(
        LoadContext(
            model="m", version="1", task=Task.EMBEDDINGS, source=str(path), path=path, options=opts
        )
    )
    await backend.load()
    return backend


class _Recorder:
    """Wraps both runners: which one ran each batch, optionally held until released."""

    def __init__(self, backend: OnnxBackend) -> None:
        self.used: list[str] = []
        self.threads: list[str] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Semaphore(0)
        backend._runner = self._wrap("narrow", backend._runner)
        backend._wide_runner = self._wrap("wide", backend._wide_runner)

    def _wrap(self, name: str, runner: Any) -> Any:
        recorder = self

        class Wrapped:
            def run(self, batch: Any) -> Any:
                recorder.used.append(name)
                recorder.threads.append(threading.current_thread().name)
                recorder.entered.release()
                recorder.hold.wait(timeout=30)
                return runner.run(batch)

        return Wrapped()


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_backend, "usable_cores", lambda: 2)


async def test_a_batch_on_an_idle_model_runs_on_the_wide_session(
    tiny_encoder: Path, two_cores: None
) -> None:
    backend = await _backend(tiny_encoder)
    params = backend.info().parameters
    assert backend.concurrent_batches == 2
    assert params["intra_op_threads"] == 1 and params["wide_session_threads"] == "auto"
    assert backend._wide_runner._session.get_session_options().intra_op_num_threads == 0
    assert backend._runner._session.get_session_options().intra_op_num_threads == 1
    recorder = _Recorder(backend)
    (result,) = await backend.infer([EmbeddingRequest(("a lone cat",))])
    await backend.infer([EmbeddingRequest(("a cat",)), EmbeddingRequest(("a dog",))])
    assert recorder.used == ["wide", "wide"]  # one after the other: each found the model idle
    assert len(result.embeddings[0]) == 32  # type: ignore[union-attr]


async def test_a_batch_overlapping_another_runs_on_the_narrow_session(
    tiny_encoder: Path, two_cores: None
) -> None:
    backend = await _backend(tiny_encoder)
    recorder = _Recorder(backend)
    recorder.hold.clear()
    first = asyncio.create_task(backend.infer([EmbeddingRequest(("the cat sat",))]))
    assert await asyncio.to_thread(recorder.entered.acquire, timeout=30)
    second = asyncio.create_task(backend.infer([EmbeddingRequest(("a dog ran",))]))
    assert await asyncio.to_thread(recorder.entered.acquire, timeout=30)
    recorder.hold.set()
    (one,), (two,) = await asyncio.gather(first, second)
    # The first found the model idle; the second found the first still running.
    assert recorder.used == ["wide", "narrow"]
    assert backend._running == 0
    assert one.embeddings != two.embeddings  # each caller got its own answer  # type: ignore[union-attr]
    recorder.used.clear()
    await backend.infer([EmbeddingRequest(("third",))])
    assert recorder.used == ["wide"]  # idle again


async def test_runs_use_the_versions_own_threads_until_it_unloads(
    tiny_encoder: Path, two_cores: None
) -> None:
    backend = await _backend(tiny_encoder)
    recorder = _Recorder(backend)
    recorder.hold.clear()
    first = asyncio.create_task(backend.infer([EmbeddingRequest(("the cat sat",))]))
    assert await asyncio.to_thread(recorder.entered.acquire, timeout=30)
    second = asyncio.create_task(backend.infer([EmbeddingRequest(("a dog ran",))]))
    assert await asyncio.to_thread(recorder.entered.acquire, timeout=30)
    recorder.hold.set()
    await asyncio.gather(first, second)
    await backend.infer([EmbeddingRequest(("third",))])
    assert recorder.used == ["wide", "narrow", "wide"]
    wide, narrow, again = recorder.threads
    assert re.fullmatch(r"onnx-m-wide_0", wide) and re.fullmatch(r"onnx-m_\d", narrow)
    assert again == wide  # the wide session always runs on its one warm thread
    pools = [backend._threads, backend._wide_thread]
    await backend.unload()
    for pool in pools:
        assert pool is not None
        with pytest.raises(RuntimeError, match="shutdown"):
            pool.submit(print)
    assert backend._threads is None and backend._wide_thread is None


async def test_without_the_wide_session_everything_runs_narrow(
    tiny_encoder: Path, two_cores: None
) -> None:
    backend = await _backend(tiny_encoder, wide_session=False)
    assert backend._wide_runner is None
    assert "wide_session_threads" not in backend.info().parameters
    assert backend._runner._session.get_session_options().intra_op_num_threads == 1
    (result,) = await backend.infer([EmbeddingRequest(("a lone cat",))])
    assert len(result.embeddings[0]) == 32  # type: ignore[union-attr]


async def test_one_core_keeps_one_session(
    tiny_encoder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(onnx_backend, "usable_cores", lambda: 1)
    backend = await _backend(tiny_encoder)
    assert backend.concurrent_batches == 1 and backend._wide_runner is None
    assert backend.info().parameters["intra_op_threads"] == "auto"
