"""modelyard's app as a Ray Serve ingress deployment, for KubeRay's ``RayService``.

``modelyard serve --engine ray`` runs modelyard's own uvicorn ingress and calls replicas
through deployment handles; that is the faster path (bench/scale.py). A ``RayService``
instead declares its applications in ``serveConfigV2``: this builder is their import path::

    import_path: modelyard.api.ray_ingress:build
    args: {config: /etc/modelyard/modelyard.toml, ingress_replicas: 2}

Each ingress replica builds the same app from the same config (``[cluster] engine = "ray"``,
``address = "auto"`` forced), so auth, limits, breaker, failover and cache behave as in one
process; Ray's proxy sends HTTP to it.
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from litestar import Litestar

from modelyard.api.app import create_app, load_plugins
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, load_settings

__all__ = ["build", "ingress_app"]

#: The ingress deployment's name in ``serve status`` and its replicas' process titles.
INGRESS = "modelyard-ingress"


def ingress_app(config: str) -> Litestar:
    """The app of one ingress replica (built inside it, where Ray is already connected)."""
    settings = _in_cluster(load_settings(config))
    plugins = load_plugins(settings)
    service = InferenceService(settings, plugins)
    return create_app(settings, plugins=plugins, service=service)


def _in_cluster(settings: Settings) -> Settings:
    cluster = msgspec.structs.replace(settings.cluster, engine="ray", address="auto")
    return msgspec.structs.replace(settings, cluster=cluster)


def build(args: dict[str, Any]) -> Any:
    """The ``RayService`` application builder: ``args`` name the config and the replicas."""
    from ray import serve

    config = str(args.get("config") or os.environ.get("MODELYARD_CONFIG", ""))
    if not config:
        raise ValueError("modelyard.api.ray_ingress:build needs args.config (a TOML file)")
    replicas = int(args.get("ingress_replicas", 1))
    def builder() -> Litestar:  # Serve calls a plain function once per replica
        return ingress_app(config)

    wrapped = serve.ingress(builder)
    deployment = serve.deployment(
        name=INGRESS, num_replicas=replicas, ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=1000,
    )(wrapped(type(INGRESS.replace("-", "_"), (), {})))
    return deployment.bind()
