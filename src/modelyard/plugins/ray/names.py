"""Names an operator finds in ``ps``, ``ray list actors`` and ``serve status``."""

from __future__ import annotations

__all__ = ["COORDINATOR", "app_name", "deployment_name"]

#: The named actor (one per namespace) holding the cluster's routing and deployments.
COORDINATOR = "modelyard-coordinator"


def deployment_name(model: str, version: str) -> str:
    """``chat-2``: replica processes show as ``ray::ServeReplica:<app>:chat-2``."""
    return f"{model}-{version}"


def app_name(namespace: str, model: str, version: str) -> str:
    """One Serve application per version, so versions deploy and delete independently."""
    return f"{namespace}-{model}-{version}"
