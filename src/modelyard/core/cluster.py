"""The cluster extension point: model versions served by replicas elsewhere (Ray Serve).

In one process a version's backend runs inside the server. With a ``Cluster`` (a plugin's
``open_cluster`` answer) the ingress keeps its whole pipeline (auth, limits, breaker,
failover, cache) and each version's backend is a stand-in that calls the version's replicas;
the backend, its batcher and its runtime run there.

Which version of each model is active is shared: an ingress that changes it (swap, rollback,
canary, load, unload, a new version) publishes the model's ``ModelRouting``; the cluster keeps
the newest under an epoch and every other ingress applies it (``ClusterLink``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from msgspec import Struct, field

from modelyard.core.backend import Backend
from modelyard.core.settings import ModelSpec

__all__ = [
    "Cluster",
    "ClusterLink",
    "ClusterState",
    "ModelRouting",
    "ReplicaBackend",
    "RoutedVersion",
    "LoadProgress",
]

log = logging.getLogger(__name__)

#: ``progress(phase, percent)`` while a version's replicas start.
LoadProgress = Callable[[str, float], None]


class RoutedVersion(Struct, frozen=True, kw_only=True):
    """A version as every ingress must know it: how to build it, and whether it serves."""

    #: The ``[[models]]`` entry (``decode_settings`` input) that builds this version.
    entry: dict[str, Any]
    serving: bool = True


class ModelRouting(Struct, frozen=True, kw_only=True):
    """One model's versions, its active version and its canary, as the cluster agrees."""

    versions: dict[str, RoutedVersion] = field(default_factory=dict)
    active: str | None = None
    #: ``(version, percent)`` of a running canary.
    canary: tuple[str, float] | None = None


class ClusterState(Struct, frozen=True, kw_only=True):
    """Every model's routing under one epoch; a larger epoch is a newer state."""

    epoch: int = 0
    models: dict[str, ModelRouting] = field(default_factory=dict)


class ReplicaBackend(Backend):
    """The stand-in backend of a version whose replicas run elsewhere."""

    #: The replicas' digest of the weights, for response-cache keys (None: not computed).
    weights_digest: str | None = None


class Cluster:
    """Base class of a cluster engine; one instance per server process.

    Override every method; the ingress calls them from its event loop.
    """

    #: The ``[cluster] engine`` value this class serves.
    name: ClassVar[str] = ""

    async def start(self) -> None:
        """Join the cluster (or start one). Override."""

    async def stop(self) -> None:
        """Leave the cluster; replicas other ingresses use keep running. Override."""

    async def build_backend(self, spec: ModelSpec, progress: LoadProgress) -> ReplicaBackend:
        """Start (or find) ``spec``'s replicas and return the backend that calls them, its
        ``task`` set from what the replicas loaded. Raise ``ModelLoadError`` with a message
        for clients when they cannot start. Override."""
        raise NotImplementedError

    async def publish(self, model: str, routing: ModelRouting) -> int:
        """Make ``routing`` the cluster's for ``model``; return the new epoch. Override."""
        raise NotImplementedError

    async def watch(self, after_epoch: int, timeout_s: float) -> ClusterState | None:
        """The cluster's state once its epoch passes ``after_epoch``; None when ``timeout_s``
        passes first. Override."""
        raise NotImplementedError

    def metrics_exposition(self) -> bytes:
        """Prometheus text of every replica's metrics, labelled by replica. Override."""
        return b""

    def replicas_ready(self, model: str, version: str) -> bool:
        """Whether ``version`` of ``model`` has a healthy replica now (readiness asks; it
        must answer at once, from what the engine last heard). Override."""
        return True


#: Applies one model's routing to this server (the deployments' ``apply_routing``).
ApplyRouting = Callable[[str, ModelRouting], Awaitable[None]]


class ClusterLink:
    """Keeps this server's routing and the cluster's in step: publishes local changes and
    applies the changes other ingresses publish, newest epoch first, one model at a time."""

    def __init__(self, cluster: Cluster, apply: ApplyRouting, *, retry_s: float = 1.0) -> None:
        self.cluster = cluster
        self._apply = apply
        self._retry_s = retry_s
        #: The newest epoch this server has applied or published.
        self.epoch = 0
        self._task: asyncio.Task[None] | None = None
        self._known: dict[str, ModelRouting] = {}
        self._order = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def join(self, local: dict[str, ModelRouting]) -> None:
        """After loading: adopt the cluster's routing of models it knows (another server
        may have swapped them), publish ours for models it does not, then follow it."""
        try:
            state = await self.cluster.watch(-1, timeout_s=0.0)
        except Exception:  # the follower keeps trying; this server serves its config meanwhile
            log.exception("cannot read the cluster's routing; following it once it answers")
            self.start()
            return
        if state is not None:
            await self.apply(state)
        for model, routing in local.items():
            if state is None or model not in state.models:
                await self.publish(model, routing)
        self.start()

    async def publish(self, model: str, routing: ModelRouting) -> None:
        """Share a change made here; a store failure is logged, the local change stands."""
        async with self._order:  # changes reach the cluster in the order they were made
            if self._known.get(model) == routing:
                return
            self._known[model] = routing
            try:
                self.epoch = max(self.epoch, await self.cluster.publish(model, routing))
            except Exception:
                log.exception("could not publish the routing of %s to the cluster", model)

    async def apply(self, state: ClusterState) -> None:
        """Apply every model whose routing differs from what this server knows."""
        for model, routing in state.models.items():
            if self._known.get(model) == routing:
                continue
            self._known[model] = routing
            try:
                await self._apply(model, routing)
            except Exception:
                log.exception("applying the cluster's routing of %s failed", model)
        self.epoch = max(self.epoch, state.epoch)

    async def _follow(self) -> None:
        while True:
            try:
                state = await self.cluster.watch(self.epoch, timeout_s=30.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("cannot reach the cluster's version state; retrying", exc_info=True)
                await asyncio.sleep(self._retry_s)
                continue
            if state is not None and state.epoch > self.epoch:
                await self.apply(state)
