"""The ``[cluster]`` config section and each model's placement in a cluster (replicas,
autoscaling, actor resources); the Ray engine that reads them lives in ``modelyard.plugins.ray``."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta, Struct, field

__all__ = ["AutoscalingSettings", "ClusterSettings", "Placement"]


class ClusterSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[cluster]``: serve from this process (``local``) or over a Ray cluster (``ray``)."""

    #: ``ray``, or the name of another plugin's engine (``open_cluster``).
    engine: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")] = "local"
    #: ``local`` starts a Ray instance for this server; ``auto`` joins the one this machine
    #: runs (``ray start --head``); ``ray://HOST:PORT`` joins a remote cluster.
    address: str = "local"
    #: Ray namespace holding modelyard's deployments and its version-state actor; servers
    #: sharing one namespace share models, versions and swaps.
    namespace: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "modelyard"
    #: CPUs of the Ray instance that ``address = "local"`` starts (None: all of them).
    num_cpus: Annotated[int, Meta(ge=1)] | None = None
    #: A shared store, ``redis://`` or ``valkey://`` (``rediss://`` for TLS): token-bucket
    #: rate limits hold across every server using it. Also usable without Ray.
    store: str | None = None
    #: Seconds an ingress waits between checks of the cluster's active versions when it
    #: cannot wait on the version-state actor (it normally hears of a change at once).
    sync_interval_s: Annotated[float, Meta(gt=0)] = 1.0


class AutoscalingSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[models.autoscaling]``: Ray Serve's replica autoscaler for this model."""

    min_replicas: Annotated[int, Meta(ge=0)] = 1
    max_replicas: Annotated[int, Meta(ge=1)] = 1
    target_ongoing_requests: Annotated[float, Meta(gt=0)] = 2.0


class Placement(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where a model's versions run in a cluster; ignored (with a warning) in one process."""

    replicas: Annotated[int, Meta(ge=1)] | None = None
    autoscaling: AutoscalingSettings | None = None
    #: Ray's actor options for each replica: ``num_cpus``, ``num_gpus``, ``memory``, ...
    ray_actor_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_default(self) -> bool:
        return self.replicas is None and self.autoscaling is None and not self.ray_actor_options
