"""``Coordinator``: the named actor holding what every ingress of a namespace must agree on.

- the routing of every model under an epoch (``publish``, ``watch``): one source of truth for
  which version is active, so every ingress switches within one round trip of a change;
- which Serve applications (one per version) exist, who deploys one (the first to ``claim``
  it; the others wait) and who still uses it (it is deleted when the last ingress releases it);
- the failure a replica reported while loading, and each replica's latest metrics.

Routing crosses as msgpack bytes of ``ClusterState``/``ModelRouting``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgspec

from modelyard.core.cluster import ClusterState, ModelRouting
from modelyard.plugins.ray.metrics import relabel

__all__ = ["Claim", "Coordinator"]

#: Replica metrics older than this are from a replica that is gone.
METRICS_STALE_S = 30.0
#: How old the running-replica counts may be: one ``serve.status()`` per namespace at most this
#: often, whatever the number of ingresses (it costs tens of ms of CPU per call, more per app).
RUNNING_TTL_S = 2.0


class Claim(msgspec.Struct, frozen=True):
    #: ``deploy``: the caller deploys it now; ``running``: it exists; ``wait``: another
    #: ingress deploys or deletes it, ask again after ``settled``.
    verdict: str


class Coordinator:
    """An async Ray actor (``num_cpus=0``, detached, one per namespace)."""

    def __init__(self) -> None:
        self._state = ClusterState()
        self._changed = asyncio.Event()
        self._apps: dict[str, str] = {}  # app -> "deploying" | "running" | "deleting"
        self._users: dict[str, set[str]] = {}
        self._settled: dict[str, asyncio.Event] = {}
        self._failures: dict[str, str] = {}
        self._metrics: dict[str, tuple[float, bytes]] = {}
        self._running: dict[str, int] = {}
        self._ingresses: set[str] = set()
        self._running_at = -RUNNING_TTL_S
        self._polling = asyncio.Lock()

    # -- members -----------------------------------------------------------------------------

    async def join(self, ingress: str) -> None:
        self._ingresses.add(ingress)

    async def leave(self, ingress: str) -> None:
        """An ingress stopping (after releasing its versions). The last one to leave, with no
        application left, ends this actor: a namespace left unused keeps nothing running."""
        self._ingresses.discard(ingress)
        if not self._ingresses and not self._apps:
            import ray

            ray.actor.exit_actor()  # type: ignore[no-untyped-call]

    # -- routing -----------------------------------------------------------------------------

    async def publish(self, model: str, routing: bytes) -> int:
        decoded = msgspec.msgpack.decode(routing, type=ModelRouting)
        models = dict(self._state.models)
        models[model] = decoded
        self._state = ClusterState(epoch=self._state.epoch + 1, models=models)
        self._changed.set()
        self._changed = asyncio.Event()
        return self._state.epoch

    async def watch(self, after_epoch: int, timeout_s: float) -> bytes | None:
        if self._state.epoch <= after_epoch and timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        if self._state.epoch <= after_epoch:
            return None
        return msgspec.msgpack.encode(self._state)

    # -- applications --------------------------------------------------------------------------

    async def claim(self, app: str, ingress: str) -> Claim:
        state = self._apps.get(app)
        if state is None:
            self._apps[app] = "deploying"
            self._settled[app] = asyncio.Event()
            self._failures.pop(app, None)
            self._users.setdefault(app, set()).add(ingress)
            return Claim("deploy")
        if state == "running":
            self._users.setdefault(app, set()).add(ingress)
            return Claim("running")
        return Claim("wait")

    async def settled(self, app: str, timeout_s: float) -> None:
        event = self._settled.get(app)
        if event is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)

    async def deployed(self, app: str, ok: bool) -> None:
        """The deploying ingress's outcome; a failed app is forgotten so a retry deploys."""
        self._running_at = -RUNNING_TTL_S  # the next ask sees the new app
        if ok:
            self._apps[app] = "running"
        else:
            self._apps.pop(app, None)
            self._users.pop(app, None)
        self._settle(app)

    async def failure(self, app: str) -> str:
        return self._failures.get(app, "")

    async def report_failure(self, app: str, error: str) -> None:
        self._failures[app] = error

    async def release(self, app: str, ingress: str) -> bool:
        """True when ``ingress`` was the last user: it deletes the app, then calls ``gone``."""
        users = self._users.get(app, set())
        users.discard(ingress)
        if users or self._apps.get(app) != "running":
            return False
        self._apps[app] = "deleting"
        self._settled[app] = asyncio.Event()
        return True

    async def gone(self, app: str) -> None:
        self._running_at = -RUNNING_TTL_S
        self._apps.pop(app, None)
        self._users.pop(app, None)
        self._settle(app)

    async def forget(self, app: str) -> None:
        """An app Serve no longer has (deleted by hand, a Serve restart): deploy it again."""
        await self.gone(app)

    def _settle(self, app: str) -> None:
        event = self._settled.pop(app, None)
        if event is not None:
            event.set()

    async def running(self, apps: list[str]) -> dict[str, int]:
        """Running replicas of each of ``apps``, at most ``RUNNING_TTL_S`` old."""
        async with self._polling:
            if time.monotonic() - self._running_at >= RUNNING_TTL_S:
                self._running = await asyncio.to_thread(_running_by_app, list(self._apps))
                self._running_at = time.monotonic()
        return {app: self._running.get(app, 0) for app in apps}

    # -- metrics -------------------------------------------------------------------------------

    async def report_metrics(self, replica: str, exposition: bytes) -> None:
        self._metrics[replica] = (time.monotonic(), exposition)

    async def metrics(self) -> dict[str, bytes]:
        now = time.monotonic()
        for key in [k for k, (at, _) in self._metrics.items() if now - at > METRICS_STALE_S]:
            del self._metrics[key]
        return {key: body for key, (_, body) in self._metrics.items()}

    async def exposition(self) -> bytes:
        """Every replica's metrics, relabelled here once rather than in every ingress."""
        return relabel(await self.metrics())


def _running_by_app(apps: list[str]) -> dict[str, int]:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    statuses = serve.status().applications
    running: dict[str, int] = {}
    for app in apps:
        status = statuses.get(app)
        running[app] = 0 if status is None else sum(
            d.replica_states.get(ReplicaState.RUNNING, 0) for d in status.deployments.values()
        )
    return running
