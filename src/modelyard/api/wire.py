"""Small helpers shared by the protocol controllers."""

from __future__ import annotations

from modelyard.core.registry import ModelVersion

__all__ = ["model_headers"]


def model_headers(version: ModelVersion) -> dict[str, str]:
    """Every model response says which version answered."""
    return {"X-Model-Name": version.name, "X-Model-Version": version.version}
