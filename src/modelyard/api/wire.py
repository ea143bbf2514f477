"""Small helpers shared by the protocol controllers."""

from __future__ import annotations

from typing import Any

from litestar import Request

from modelyard.cache.config import CacheDirective
from modelyard.core.registry import ModelVersion

__all__ = ["cache_directive", "model_headers"]


def model_headers(version: ModelVersion) -> dict[str, str]:
    """Every model response says which version answered."""
    return {"X-Model-Name": version.name, "X-Model-Version": version.version}


def cache_directive(request: Request[Any, Any, Any]) -> CacheDirective | None:
    """``Cache-Control: no-store`` skips the cache; ``no-cache`` bypasses the read and refreshes the entry."""
    directives = {p.strip().lower() for p in request.headers.get("cache-control", "").split(",")}
    if "no-store" in directives:
        return None
    user = request.scope.get("user")
    return CacheDirective(tenant=getattr(user, "tenant", "") or "", refresh="no-cache" in directives)


def cache_headers(directive: CacheDirective | None) -> dict[str, str]:
    return {"X-Cache": directive.status if directive is not None else "BYPASS"}
