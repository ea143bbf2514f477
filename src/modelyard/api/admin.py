"""Model administration routes over the core service: versions, swap, rollback, canary."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Response, delete, get, post

from modelyard.api.schema import problems
from modelyard.api.security import Caller
from modelyard.core.service import InferenceService
from modelyard.core.types import Task
from modelyard.core.views import Overview, SafetyReport, VersionView

__all__ = ["AdminController"]


class NewVersionBody(msgspec.Struct, forbid_unknown_fields=True):
    version: str
    source: str
    backend: str | None = None
    task: Task | None = None
    options: dict[str, Any] | None = None


class SwapBody(msgspec.Struct, forbid_unknown_fields=True):
    to: str


class CanaryBody(msgspec.Struct, forbid_unknown_fields=True):
    to: str
    percent: Annotated[float, msgspec.Meta(gt=0, le=100)]


class AddedVersion(VersionView, frozen=True, kw_only=True):
    """The new version's view and the URL to poll for its state and progress."""

    url: str


class SwapAnswer(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    active_version: str
    previous: str | None
    report: SafetyReport


def _version_url(name: str, version: str) -> str:
    return f"/admin/models/{name}/versions/{version}"


class AdminController(Controller):
    path = "/admin"
    tags = ("Administration",)

    @get("/models")
    async def models(self, service: InferenceService, principal: Caller) -> Overview:
        """Every model (the caller may see) with its versions, states, progress and parameters."""
        return service.overview(principal)

    @post("/models/{name:str}/versions", status_code=202, responses=problems(404, 409, 422))
    async def add_version(
        self, name: str, data: NewVersionBody, service: InferenceService
    ) -> Response[AddedVersion]:
        """Load a new version in the background; poll the returned URL for state and progress."""
        view = service.add_version(
            name, data.version, data.source, backend=data.backend, task=data.task,
            options=data.options,
        )
        url = _version_url(name, view.version)
        body = AddedVersion(**msgspec.structs.asdict(view), url=url)
        return Response(body, status_code=202, headers={"Location": url})

    @get("/models/{name:str}/versions/{version:str}", responses=problems(404))
    async def get_version(self, name: str, version: str, service: InferenceService) -> VersionView:
        return service.version_view(name, version)

    @delete("/models/{name:str}/versions/{version:str}", status_code=200,
            responses=problems(404, 409))
    async def delete_version(
        self, name: str, version: str, service: InferenceService
    ) -> dict[str, Any]:
        """Unload a version (refused for the active one); its memory is released."""
        await service.unload_version(name, version)
        return {"name": name, "version": version, "unloaded": True}

    @get("/models/{name:str}/swap/safety", responses=problems(400, 404))
    async def swap_safety(self, name: str, to: str, service: InferenceService) -> SafetyReport:
        return await service.swap_safety(name, to)

    @post("/models/{name:str}/swap", status_code=200, responses=problems(404, 409))
    async def swap(self, name: str, data: SwapBody, service: InferenceService) -> SwapAnswer:
        """Atomically make a ready version active; 409 with the safety report when unsafe."""
        report = await service.swap(name, data.to)
        return SwapAnswer(name=name, active_version=data.to, previous=report.from_,
                          report=report)

    @post("/models/{name:str}/rollback", status_code=200, responses=problems(404, 409))
    async def rollback(self, name: str, service: InferenceService) -> dict[str, Any]:
        """Return to the previous active version."""
        active = await service.rollback(name)
        return {"name": name, "active_version": active}

    @post("/models/{name:str}/canary", status_code=200, responses=problems(404, 409))
    async def canary(
        self, name: str, data: CanaryBody, service: InferenceService
    ) -> dict[str, Any]:
        """Shift ``percent`` of traffic to a ready version; it rolls back by itself on errors."""
        canary = service.start_canary(name, data.to, data.percent)
        return {"name": name, "canary": canary.snapshot(), "traffic": service.traffic(name)}

    @post("/models/{name:str}/canary/promote", status_code=200, responses=problems(404, 409))
    async def promote(self, name: str, service: InferenceService) -> dict[str, Any]:
        """Make the canary the active version (a swap, with its safety checks)."""
        report = await service.promote_canary(name)
        return {"name": name, "active_version": report.to, "previous": report.from_}

    @delete("/models/{name:str}/canary", status_code=200, responses=problems(404, 409))
    async def stop_canary(self, name: str, service: InferenceService) -> dict[str, Any]:
        service.stop_canary(name)
        return {"name": name, "traffic": service.traffic(name)}

    @get("/cache", responses=problems(409))
    async def cache_stats(self, service: InferenceService) -> dict[str, Any]:
        """Response cache counters: hits, misses, coalesced, per-tier sizes and dedup ratio."""
        return service.cache_stats()

    @delete("/cache", status_code=200, responses=problems(409))
    async def purge_cache(
        self, service: InferenceService, model: str | None = None
    ) -> dict[str, Any]:
        """Purge one model's cached responses (``?model=``), or all of them."""
        await service.purge_cache(model)
        return {"purged": model if model is not None else "all"}
