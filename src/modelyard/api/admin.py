"""Model administration routes over the core service."""

from __future__ import annotations

from typing import Any

from litestar import Controller, get

from modelyard.core.service import InferenceService

__all__ = ["AdminController"]


class AdminController(Controller):
    path = "/admin"
    tags = ["Administration"]

    @get("/models")
    async def models(self, service: InferenceService) -> dict[str, Any]:
        """Every model with its versions, states, load progress and runtime parameters."""
        return {"models": service.describe(), "ready": service.ready()}
