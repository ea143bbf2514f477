"""The Ray engine: ``[cluster] engine = "ray"`` serves each model version as a Ray Serve
application of its own, called from modelyard's ingress through deployment handles.

Registered through the ``modelyard`` entry-point group like any plugin; Ray itself is imported
only when a config asks for it (``pip install 'modelyard[ray]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelyard.core.hookspecs import hookimpl
from modelyard.core.settings import Settings

if TYPE_CHECKING:
    from modelyard.core.cluster import Cluster

__all__ = ["open_cluster"]


@hookimpl
def open_cluster(settings: Settings) -> Cluster | None:
    if settings.cluster.engine != "ray":
        return None
    from modelyard.plugins.ray.engine import RayCluster
    from modelyard.testing.plugin import add_named_fakes

    # Replicas see the fake backends a config names, as the ingress does (tests, demos).
    return RayCluster(settings, add_plugins=add_named_fakes)
