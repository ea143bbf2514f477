"""Servers sharing a cluster agree on each model's active version (``ClusterLink``).

An in-memory cluster stands in for Ray: its "replicas" are the fake backends in this process,
its routing board is shared by every service of the test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from modelyard import hookimpl
from modelyard.core.backend import Backend, LoadContext
from modelyard.core.cluster import (
    Cluster,
    ClusterState,
    LoadProgress,
    ModelRouting,
    ReplicaBackend,
)
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import ModelSpec, Settings
from modelyard.core.types import (
    EmbeddingRequest,
    EmbeddingResult,
    InferenceRequest,
    InferenceResult,
    StreamChunk,
)


class Board:
    """The routing every member sees, as the coordinator actor keeps it."""

    def __init__(self) -> None:
        self.state = ClusterState()
        self.changed = asyncio.Condition()
        self.healthy = True
        self.fail_publish = False


class LocalReplica(ReplicaBackend):
    def __init__(self, context: LoadContext, inner: Backend) -> None:
        super().__init__(context)
        self.inner = inner
        self.task = inner.task
        self.max_batch_size = inner.max_batch_size
        self.weights_digest = "digest"

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        return await self.inner.infer(batch)

    def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        return self.inner.stream(request)


class MemoryCluster(Cluster):
    name = "memory"

    def __init__(self, board: Board) -> None:
        self.board = board

    async def build_backend(self, spec: ModelSpec, progress: LoadProgress) -> ReplicaBackend:
        context = LoadContext(model=spec.name, version=spec.version, task=spec.task,
                              source=spec.source, path=None, options=spec.options)
        inner = spec.backend(context)
        await inner.load()
        return LocalReplica(context, inner)

    async def publish(self, model: str, routing: ModelRouting) -> int:
        if self.board.fail_publish:
            raise ConnectionError("the coordinator is gone")
        async with self.board.changed:
            models = {**self.board.state.models, model: routing}
            self.board.state = ClusterState(epoch=self.board.state.epoch + 1, models=models)
            self.board.changed.notify_all()
        return self.board.state.epoch

    async def watch(self, after_epoch: int, timeout_s: float) -> ClusterState | None:
        async with self.board.changed:
            if self.board.state.epoch <= after_epoch and timeout_s > 0:
                try:
                    await asyncio.wait_for(
                        self.board.changed.wait_for(lambda: self.board.state.epoch > after_epoch),
                        timeout_s,
                    )
                except TimeoutError:
                    return None
            return self.board.state if self.board.state.epoch > after_epoch else None

    def replicas_ready(self, model: str, version: str) -> bool:
        return self.board.healthy


class MemoryPlugin:
    def __init__(self, board: Board) -> None:
        self.board = board

    @hookimpl
    def open_cluster(self, settings: Settings) -> Cluster | None:
        return MemoryCluster(self.board) if settings.cluster.engine == "memory" else None


@pytest.fixture
def board(plugin_host: PluginHost) -> Board:
    board = Board()
    plugin_host.register(MemoryPlugin(board), name="memory-cluster", source="tests")
    return board


@pytest.fixture
def settings(make_settings: Callable[..., Settings], tmp_path: Path) -> Settings:
    return make_settings(cluster={"engine": "memory"}, models=[
        {"name": "m", "backend": "echo", "source": str(tmp_path), "task": "embeddings"},
        {"name": "m", "version": "2", "backend": "echo", "source": str(tmp_path),
         "task": "embeddings", "active": False, "options": {"salt": "v2:"}},
    ])


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Let the other service's follower run: bounded turns of the loop, no timer."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


async def _started(settings: Settings, host: PluginHost) -> InferenceService:
    service = InferenceService(settings, host)
    await service.start()
    await service.wait_until_loaded()
    return service


def _active(service: InferenceService) -> str | None:
    return service.registry.entry("m").active_version


async def _embedding(service: InferenceService) -> list[float]:
    answer = await service.infer("m", EmbeddingRequest(inputs=("x",)))
    assert isinstance(answer.result, EmbeddingResult)
    return answer.result.embeddings[0]


async def test_a_swap_on_one_server_reaches_the_other(
    settings: Settings, plugin_host: PluginHost, board: Board
) -> None:
    a = await _started(settings, plugin_host)
    b = await _started(settings, plugin_host)
    try:
        assert _active(a) == _active(b) == "1"
        await a.swap("m", "2")
        await a.published()
        await _until(lambda: _active(b) == "2", "b following the swap")
        assert await _embedding(b) == await _embedding(a)  # the same version answers
        await b.rollback("m")
        await b.published()
        await _until(lambda: _active(a) == "1", "a following the rollback")
        assert board.state.models["m"].active == "1"
    finally:
        await a.stop()
        await b.stop()


async def test_a_server_that_joins_later_adopts_the_clusters_active_version(
    settings: Settings, plugin_host: PluginHost, board: Board
) -> None:
    a = await _started(settings, plugin_host)
    try:
        await a.swap("m", "2")
        await a.published()
        late = await _started(settings, plugin_host)
        try:
            assert _active(late) == "2"  # not its config's "1"
        finally:
            await late.stop()
    finally:
        await a.stop()


async def test_a_version_added_on_one_server_is_built_and_activated_on_the_other(
    settings: Settings, plugin_host: PluginHost, board: Board, tmp_path: Path
) -> None:
    a = await _started(settings, plugin_host)
    b = await _started(settings, plugin_host)
    try:
        a.add_version("m", "3", str(tmp_path), options={"salt": "v3:"})
        await _until(lambda: a.registry.entry("m").versions["3"].serving, "v3 loaded on a")
        await a.swap("m", "3")
        await a.published()
        await _until(lambda: _active(b) == "3", "b building and activating v3")
        assert await _embedding(b) == await _embedding(a)
    finally:
        await a.stop()
        await b.stop()


async def test_a_canary_is_shared(
    settings: Settings, plugin_host: PluginHost, board: Board
) -> None:
    a = await _started(settings, plugin_host)
    b = await _started(settings, plugin_host)
    try:
        a.start_canary("m", "2", 25.0)
        await a.published()
        await _until(lambda: b.traffic("m") == {"1": 75.0, "2": 25.0}, "b's canary")
        a.stop_canary("m")
        await a.published()
        await _until(lambda: b.traffic("m") == {"1": 100.0}, "b's canary stopped")
    finally:
        await a.stop()
        await b.stop()


async def test_readiness_waits_for_a_healthy_replica(
    settings: Settings, plugin_host: PluginHost, board: Board
) -> None:
    a = await _started(settings, plugin_host)
    try:
        assert a.ready()
        board.healthy = False  # every replica of the active version is gone
        assert not a.ready()
        assert a.readiness().waiting == ["m"]
    finally:
        await a.stop()


async def test_a_store_failure_keeps_the_local_change(
    settings: Settings, plugin_host: PluginHost, board: Board,
    caplog: pytest.LogCaptureFixture,
) -> None:
    a = await _started(settings, plugin_host)
    try:
        board.fail_publish = True
        await a.swap("m", "2")
        await a.published()
        assert _active(a) == "2"
        assert "could not publish the routing of m" in caplog.text
    finally:
        await a.stop()


async def test_a_version_removed_on_one_server_is_taken_out_of_service_on_the_other(
    settings: Settings, plugin_host: PluginHost, board: Board
) -> None:
    a = await _started(settings, plugin_host)
    b = await _started(settings, plugin_host)
    try:
        assert b.registry.entry("m").versions["2"].serving
        await a.unload_version("m", "2")
        await a.published()
        await _until(lambda: not b.registry.entry("m").versions["2"].serving, "b retiring v2")
        assert _active(b) == "1"
    finally:
        await a.stop()
        await b.stop()


async def test_a_cluster_that_cannot_answer_at_start_leaves_the_config_serving(
    settings: Settings, plugin_host: PluginHost, board: Board,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    async def unreachable(self: MemoryCluster, after_epoch: int, timeout_s: float) -> None:
        raise ConnectionError("the coordinator is gone")

    monkeypatch.setattr(MemoryCluster, "watch", unreachable)
    a = await _started(settings, plugin_host)  # wait_until_loaded raised before
    try:
        assert _active(a) == "1" and a.ready()
        assert "cannot read the cluster's routing" in caplog.text
    finally:
        await a.stop()
