"""``RayCluster``: model versions as Ray Serve applications, routing shared by a named actor."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import uuid
from collections.abc import Callable
from typing import Any

import msgspec

from modelyard.core.backend import HealthReport, LoadContext
from modelyard.core.cluster import Cluster, ClusterState, LoadProgress, ModelRouting
from modelyard.core.errors import ModelLoadError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import ModelSpec, Settings
from modelyard.plugins.ray.coordinator import Claim, Coordinator
from modelyard.plugins.ray.names import COORDINATOR, app_name, deployment_name
from modelyard.plugins.ray.remote import RayBackend
from modelyard.plugins.ray.replica import ModelReplica, ReplicaFacts

__all__ = ["RayCluster", "replica_config"]

log = logging.getLogger(__name__)

#: How long an ingress waits for another one deploying the same version before asking again.
_SETTLE_WAIT_S = 5.0
#: How often the ingress refreshes the replicas' metrics it serves at /metrics.
_METRICS_REFRESH_S = 5.0
#: How often the ingress asks Serve how many replicas of its applications run (readiness).
_REPLICAS_REFRESH_S = 2.0
#: Constructor attempts before Serve gives up on a version that cannot load.
_CONSTRUCTOR_RETRIES = 3


def replica_config(settings: Settings, spec: ModelSpec) -> dict[str, Any]:
    """The config a replica builds ``spec`` from: the server's, with this version alone."""
    config: dict[str, Any] = msgspec.to_builtins(settings)
    config.pop("aliases", None)
    config["cluster"] = {}  # the replica serves in its own process: no cluster of its own
    config["models"] = [{
        "name": spec.name, "version": spec.version, "backend": spec.backend.name,
        "source": spec.source, "options": msgspec.to_builtins(spec.options),
        "batching": msgspec.to_builtins(spec.batching),
        **({"task": spec.task.value} if spec.task is not None else {}),
    }]
    return config


class RayCluster(Cluster):
    """One per ingress process; every ingress of a namespace shares models and routing."""

    name = "ray"

    def __init__(
        self, settings: Settings, *,
        add_plugins: Callable[[PluginHost, Settings], object] | None = None,
    ) -> None:
        self._settings = settings
        self._cluster = settings.cluster
        self._add_plugins = add_plugins
        #: This ingress among the namespace's users of each application.
        self.ingress_id = uuid.uuid4().hex[:12]
        self._coordinator: Any = None
        self._started_ray = False
        self._metrics = b""
        self._refresh: asyncio.Task[None] | None = None
        self._watching: asyncio.Task[None] | None = None
        #: Running replicas of each application this ingress uses, as Serve last said.
        self._running: dict[str, int] = {}

    # -- joining -------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._connect)
        _reclaim_signals()
        loop = asyncio.get_running_loop()
        self._refresh = loop.create_task(self._refresh_metrics())
        self._watching = loop.create_task(self._watch_replicas())

    def _connect(self) -> None:
        import ray
        from ray import serve

        address = self._cluster.address
        if not ray.is_initialized():
            if address == "local":
                ray.init(
                    namespace=self._cluster.namespace, num_cpus=self._cluster.num_cpus,
                    include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                )
                self._started_ray = True
            else:
                ray.init(
                    address=address, namespace=self._cluster.namespace, log_to_driver=False,
                    logging_level=logging.WARNING,
                )
        # modelyard's own ingress serves HTTP: Ray's proxy hop would only add latency.
        serve.start(proxy_location="Disabled")
        actor = ray.remote(Coordinator).options(
            name=COORDINATOR, namespace=self._cluster.namespace, get_if_exists=True,
            lifetime="detached", num_cpus=0, max_concurrency=10_000,
        )
        self._coordinator = actor.remote()
        ray.get(self._coordinator.join.remote(self.ingress_id))
        log.info("joined Ray at %s (namespace %s) as ingress %s", address,
                 self._cluster.namespace, self.ingress_id)

    async def stop(self) -> None:
        for task in (self._refresh, self._watching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._coordinator is not None:
            with contextlib.suppress(Exception):  # the last one out ends the coordinator
                await self._coordinator.leave.remote(self.ingress_id)
        if self._started_ray:
            import ray

            await asyncio.to_thread(ray.shutdown)

    # -- versions as applications ----------------------------------------------------------------

    async def build_backend(self, spec: ModelSpec, progress: LoadProgress) -> RayBackend:
        from ray import serve

        app = app_name(self._cluster.namespace, spec.name, spec.version)
        await self._ensure_app(app, spec, progress)
        self._running.setdefault(app, 1)
        handle = serve.get_app_handle(app)  # cached: one per process and application
        # Fewer hops per call: Serve's router runs on this event loop, not a thread of its
        # own, and calls reach the replicas over Serve's gRPC instead of Ray actor tasks.
        try:  # private options of Ray 2.60: without them, the default (slower) path
            if not handle.is_initialized:
                handle._init(_run_router_in_separate_loop=False)  # type: ignore[no-untyped-call]
            handle = handle.options(_by_reference=False)
        except (AttributeError, TypeError, ValueError):
            log.warning("this Ray version lacks the handle options modelyard uses; "
                        "calls take Serve's default path")
        progress("connecting", 80.0)
        facts: ReplicaFacts = await handle.describe.remote()
        context = LoadContext(
            model=spec.name, version=spec.version, task=None, source=spec.source, path=None,
            options=spec.options,
        )
        replicas = spec.placement.replicas or (
            spec.placement.autoscaling.max_replicas if spec.placement.autoscaling else 1
        )
        return RayBackend(
            context, handle, facts, health=lambda: self._health(app),
            release=lambda: self._release(app),
            concurrency=max(8, 2 * replicas * facts.concurrent_batches),
        )

    async def _ensure_app(self, app: str, spec: ModelSpec, progress: LoadProgress) -> None:
        while True:
            claim: Claim = await self._coordinator.claim.remote(app, self.ingress_id)
            if claim.verdict == "running":
                if await asyncio.to_thread(_serve_has, app):
                    return
                await self._coordinator.forget.remote(app)  # Serve lost it: deploy again
                continue
            if claim.verdict == "wait":
                progress("waiting for another ingress", 10.0)
                await self._coordinator.settled.remote(app, _SETTLE_WAIT_S)
                continue
            progress("starting replicas", 20.0)
            try:
                await asyncio.to_thread(self._deploy, app, spec)
            except Exception as exc:
                reason = await self._coordinator.failure.remote(app)
                await self._coordinator.deployed.remote(app, False)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(_serve_delete, app)
                log.error("the replicas of %s:%s did not start: %s", spec.name, spec.version,
                          exc)
                raise ModelLoadError(
                    reason or "its replicas did not start; the Ray Serve logs have the details"
                ) from None
            await self._coordinator.deployed.remote(app, True)
            return

    def _deploy(self, app: str, spec: ModelSpec) -> None:
        from ray import serve

        placement = spec.placement
        actor_options: dict[str, Any] = {"num_cpus": 0, **placement.ray_actor_options}
        runtime_env = dict(actor_options.get("runtime_env") or {})
        # The replica runs ModelReplica on Serve's own event loop: one thread hop less a call.
        runtime_env["env_vars"] = {
            "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", **runtime_env.get("env_vars", {})
        }
        actor_options["runtime_env"] = runtime_env
        options: dict[str, Any] = {
            "name": deployment_name(spec.name, spec.version),
            # Replicas share cores as one process's models do unless config reserves some.
            "ray_actor_options": actor_options,
            "max_ongoing_requests": max(64, spec.batching.max_queue_size),
            "max_constructor_retry_count": _CONSTRUCTOR_RETRIES,
            "health_check_period_s": 2.0,
            "health_check_timeout_s": 30.0,
            # Serve's access log writes a line per call: the ingress logs requests already.
            "logging_config": {"enable_access_log": False},
        }
        if placement.autoscaling is not None:
            scaling = placement.autoscaling
            options["autoscaling_config"] = {
                "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = placement.replicas or 1
        deployment = serve.deployment(**options)(ModelReplica)
        application = deployment.bind(
            replica_config(self._settings, spec), app, self._coordinator, self._add_plugins
        )
        serve.run(application, name=app, route_prefix=None, blocking=False)

    async def _release(self, app: str) -> None:
        self._running.pop(app, None)
        try:
            if await self._coordinator.release.remote(app, self.ingress_id):
                await asyncio.to_thread(_serve_delete, app)
                await self._coordinator.gone.remote(app)
        except Exception:  # leaving must not fail a shutdown
            log.exception("releasing %s failed", app)

    def replicas_ready(self, model: str, version: str) -> bool:
        app = app_name(self._cluster.namespace, model, version)
        return self._running.get(app, 1) > 0  # an app not yet watched: its load just passed

    async def _watch_replicas(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._running.update(await self._coordinator.running.remote(list(self._running)))
            await asyncio.sleep(_REPLICAS_REFRESH_S)

    async def _health(self, app: str) -> HealthReport:
        running = (await self._coordinator.running.remote([app]))[app]
        self._running[app] = running
        if running < 1:
            return HealthReport(healthy=False, detail="no replica is running")
        return HealthReport(healthy=True, detail=f"{running} replicas running")

    # -- routing ---------------------------------------------------------------------------------

    async def publish(self, model: str, routing: ModelRouting) -> int:
        epoch: int = await self._coordinator.publish.remote(model, msgspec.msgpack.encode(routing))
        return epoch

    async def watch(self, after_epoch: int, timeout_s: float) -> ClusterState | None:
        body = await self._coordinator.watch.remote(after_epoch, timeout_s)
        return None if body is None else msgspec.msgpack.decode(body, type=ClusterState)

    # -- metrics ---------------------------------------------------------------------------------

    def metrics_exposition(self) -> bytes:
        return self._metrics

    async def _refresh_metrics(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                self._metrics = await self.refresh_metrics()
            await asyncio.sleep(_METRICS_REFRESH_S)

    async def refresh_metrics(self) -> bytes:
        """Fetch every replica's latest metrics now (``/metrics`` serves the last fetch)."""
        self._metrics = await self._coordinator.exposition.remote()
        return self._metrics


def _reclaim_signals() -> None:
    """Give SIGTERM and SIGINT back to the server's drain.

    ``ray.init`` installs Ray's C++ failure handler over them, which aborts the process 3 s
    after a SIGTERM (absl's alarm): the drain and the release of the versions' replicas were
    cut short, leaving replicas and the coordinator running. Call from the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # inside a Serve replica (RayService) or a test's server thread: not ours
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


def _serve_has(app: str) -> bool:
    from ray import serve

    return app in serve.status().applications


def _serve_delete(app: str) -> None:
    from ray import serve

    serve.delete(app, _blocking=True)
