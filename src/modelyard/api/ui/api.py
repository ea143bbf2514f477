"""The console's JSON routes under ``/ui/api``: what the caller may do, traffic, API keys.

Everything else the console shows comes from the public API (``/admin/models``,
``/v1/models``, ``/v1/plugins``, ``/v1/batches``, ``/v1/events``, ...); these routes add
only what that API lacks. Each has its access policy in api/security.py ``POLICIES``.
"""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, delete, get, post
from msgspec import Struct

from modelyard.api.schema import problems
from modelyard.api.security import ROLE_PERMISSIONS, Caller, Permission
from modelyard.api.ui.journal import Incident
from modelyard.api.ui.keys import IssuedKeyView, KeyCreateBody, KeyList, KeyView
from modelyard.api.ui.state import ConsoleDep
from modelyard.api.ui.traffic import ModelTraffic, TrafficPoint
from modelyard.core.auth import Principal
from modelyard.core.errors import ModelNotFoundError
from modelyard.core.service import InferenceService

__all__ = ["ConsoleApiController", "SessionView", "TrafficSeries", "TrafficView"]

#: Seconds of readings behind "now" figures (requests/s, p50, p99) and behind a chart.
NOW_WINDOW_S = 30.0
CHART_SPAN_S = 300.0


class SessionView(Struct, frozen=True, kw_only=True):
    """Who the caller is and what it may do: the console offers only these actions."""

    #: Whether the server asks for credentials (False: everyone is ``anonymous``).
    auth: bool
    principal: str
    roles: list[str]
    #: ``read``, ``inspect``, ``infer``, ``operate``, ``admin`` (see docs/security.md).
    permissions: list[str]
    #: Model names or patterns the caller may use; None: every model.
    models: list[str] | None
    #: Whether API keys can be managed here (an ``apikeys`` provider is configured).
    api_keys: bool


class TrafficView(Struct, frozen=True, kw_only=True):
    """Each model's requests/s, errors/s and p50/p99 over the last ``window_s`` seconds."""

    window_s: float
    models: list[ModelTraffic]


class TrafficSeries(Struct, frozen=True, kw_only=True):
    """A model's history, one column per measure (what a chart library takes)."""

    at: list[float]
    requests_per_s: list[float]
    p50_ms: list[float | None]
    p99_ms: list[float | None]
    errors_per_s: list[float]


class ModelActivity(Struct, frozen=True, kw_only=True):
    """One model's traffic now, its last minutes, and its recent incidents."""

    model: str
    window_s: float
    span_s: float
    now: ModelTraffic
    series: TrafficSeries
    incidents: list[Incident]


def _columns(points: list[TrafficPoint]) -> TrafficSeries:
    return TrafficSeries(
        at=[p.at for p in points], requests_per_s=[p.requests_per_s for p in points],
        p50_ms=[p.p50_ms for p in points], p99_ms=[p.p99_ms for p in points],
        errors_per_s=[p.errors_per_s for p in points],
    )


def _models(service: InferenceService, principal: Principal) -> list[str]:
    return [view.name for view in service.overview(principal).models]


def _client(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client else ""


class ConsoleApiController(Controller):
    path = "/ui/api"
    tags = ("Console",)

    @get("/session")
    async def session(self, principal: Caller, console: ConsoleDep) -> SessionView:
        """The caller's identity, roles, permissions and model scopes."""
        granted = {
            permission for role in principal.roles
            for permission in ROLE_PERMISSIONS.get(role, ())
            if permission is not Permission.PUBLIC
        }
        scopes = principal.model_scopes
        return SessionView(
            auth=console.keys.security.enabled, principal=principal.id,
            roles=sorted(principal.roles),
            permissions=[p.value for p in Permission if p in granted],
            models=None if scopes is None else sorted(scopes),
            api_keys=console.keys.available,
        )

    @get("/traffic")
    async def traffic(
        self, service: InferenceService, principal: Caller, console: ConsoleDep
    ) -> TrafficView:
        """Requests/s, 5xx/s and p50/p99 latency of every model the caller may see, from the
        server's own metrics over the last 30 seconds."""
        console.read_if_due()
        return TrafficView(
            window_s=NOW_WINDOW_S,
            models=console.traffic.summary(_models(service, principal), NOW_WINDOW_S),
        )

    @get("/models/{name:str}/activity", responses=problems(404))
    async def activity(
        self, name: str, service: InferenceService, principal: Caller, console: ConsoleDep
    ) -> ModelActivity:
        """One model's traffic now, over the last five minutes, and its recent incidents
        (failed loads, breaker openings, canary rollbacks)."""
        if name not in _models(service, principal):
            raise ModelNotFoundError(f"model {name!r} not found")
        console.read_if_due()
        return ModelActivity(
            model=name, window_s=NOW_WINDOW_S, span_s=CHART_SPAN_S,
            now=console.traffic.summary([name], NOW_WINDOW_S)[0],
            series=_columns(console.traffic.series(name, CHART_SPAN_S)),
            incidents=console.journal.recent(name),
        )

    @get("/keys", responses=problems(409))
    async def list_keys(self, console: ConsoleDep) -> KeyList:
        """Every API key (never a secret), with its status."""
        return await console.keys.list()

    @post("/keys", status_code=201, responses=problems(409))
    async def create_key(
        self, data: KeyCreateBody, principal: Caller, console: ConsoleDep,
        request: Request[Any, Any, Any],
    ) -> IssuedKeyView:
        """Issue a key; the answer holds its only copy (audited as ``key.create``)."""
        return await console.keys.create(data, principal, _client(request))

    @delete("/keys/{key_id:str}", status_code=200, responses=problems(404, 409))
    async def revoke_key(
        self, key_id: str, principal: Caller, console: ConsoleDep,
        request: Request[Any, Any, Any],
    ) -> KeyView:
        """Revoke a key at once (audited as ``key.revoke``); revoking twice keeps the first
        time."""
        return await console.keys.revoke(key_id, principal, _client(request))
