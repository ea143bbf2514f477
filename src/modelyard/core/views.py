"""Read-only views of the server's state: what admin, status and metadata answers carry.

Every view is a frozen msgspec Struct built from the live objects at the moment it is asked
for; changing one changes nothing on the server.
"""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

from modelyard.core.auth import Principal
from modelyard.core.backend import BackendInfo
from modelyard.core.canary import CanaryView
from modelyard.core.registry import ModelRegistry, ModelVersion, VersionHealth, VersionState
from modelyard.core.types import Task

__all__ = [
    "AliasView",
    "IndexRow",
    "MemoryView",
    "ModelCard",
    "ModelMetadata",
    "ModelView",
    "Overview",
    "Readiness",
    "SafetyCheck",
    "SafetyReport",
    "VersionView",
    "index_rows",
    "model_cards",
    "version_view",
]


class VersionView(Struct, frozen=True, kw_only=True):
    """One version: its state, load progress, parameters and breaker."""

    name: str
    version: str
    backend: str
    task: Task | None
    source: str
    state: str | None
    phase: str
    progress: float
    error: str | None
    parameters: dict[str, Any]
    breaker: dict[str, Any]
    #: The last probe's verdict (warm-up, swap safety, periodic); None until first probed.
    health: VersionHealth | None = None
    #: ``startup`` (loaded at start) or ``on_demand`` (loaded when asked for).
    load: str = "startup"
    #: Never evicted, never unloaded when idle (a startup version always is).
    pinned: bool = True
    #: Memory it holds now, as its backend reports it; 0 while not loaded.
    memory_bytes: int = 0
    #: Requests it is serving now.
    in_flight: int = 0


class ModelView(Struct, frozen=True, kw_only=True):
    """One model name: its versions, which is active, and how traffic splits."""

    name: str
    active_version: str | None
    required: bool
    versions: list[VersionView]
    traffic: dict[str, float]
    canary: CanaryView | None
    last_canary_rollback: str | None


class AliasView(Struct, frozen=True, kw_only=True):
    """One alias: its failover chain, its counters, and each target's breaker state."""

    name: str
    targets: list[str]
    failovers: int
    exhausted: int
    answered_by: dict[str, int]
    target_states: dict[str, str]


class MemoryView(Struct, frozen=True, kw_only=True):
    """The server's memory budget: what loaded versions hold against the limits."""

    #: Bytes every loaded version holds together (their backends' ``memory_bytes``).
    used_bytes: int
    #: ``server.memory_budget_bytes``; None: no limit.
    budget_bytes: int | None
    #: Versions loaded now.
    loaded: int
    #: ``server.max_loaded_models``; None: no limit.
    max_loaded: int | None


class Overview(Struct, frozen=True, kw_only=True):
    """``GET /admin/models``: the models and aliases a caller may see, readiness and memory."""

    models: list[ModelView]
    aliases: list[AliasView]
    ready: bool
    memory: MemoryView


class Readiness(Struct, frozen=True, kw_only=True):
    """Whether the server takes traffic, and if not, why."""

    ready: bool
    draining: bool = False
    #: Required models without a serving active version.
    waiting: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return "draining" if self.draining else f"waiting for: {', '.join(self.waiting)}"


class SafetyCheck(Struct, frozen=True):
    """One check of a swap: ``target_exists``, ..., ``same_task``, ``same_signature``, ``probe``."""

    name: str
    ok: bool
    detail: str = ""


class SafetyReport(Struct, frozen=True, kw_only=True):
    """Whether a version may become active now, check by check."""

    model: str
    to: str
    from_: str | None = field(name="from")
    safe: bool
    checks: list[SafetyCheck]


class ModelCard(Struct, frozen=True, kw_only=True):
    """A model that can answer now, or once loaded on demand (``/v1/models``)."""

    name: str
    version: str
    task: Task | None
    backend: str


class IndexRow(Struct, frozen=True, kw_only=True):
    """One version in the v2 repository index."""

    name: str
    version: str
    state: str
    reason: str


class ModelMetadata(Struct, frozen=True, kw_only=True):
    """What a model (or an alias, through the version it reaches first) is and serves."""

    name: str
    versions: list[str]
    version: str
    task: Task | None
    backend: str
    state: str | None
    active_version: str | None
    breaker: dict[str, Any]
    #: The loaded backend's own description; empty while the version is not serving.
    info: BackendInfo
    #: The alias's targets in order, when ``name`` is an alias.
    alias_of: list[str] | None = None


def version_view(version: ModelVersion) -> VersionView:
    info = version.backend.info() if version.backend is not None and version.serving else None
    return VersionView(
        name=version.name,
        version=version.version,
        backend=version.spec.backend.name,
        task=version.task,
        source=version.spec.source,
        state=version.state.value if version.state else None,
        phase=version.phase,
        progress=round(version.progress, 1),
        error=version.error or None,
        parameters=info.parameters if info else {},
        breaker=version.breaker.snapshot(),
        health=version.health,
        load=version.spec.load,
        pinned=version.spec.pinned or not version.spec.on_demand,
        memory_bytes=version.held_bytes,
        in_flight=version.in_flight,
    )


def model_cards(registry: ModelRegistry, principal: Principal) -> list[ModelCard]:
    """Models the caller may use that can answer now, or after a load on demand."""
    cards = []
    for entry in registry:
        if not principal.may_use(entry.name):
            continue
        found = entry.active or next((v for v in entry.versions.values() if v.spec.active), None)
        if found is None or not (found.serving or found.spec.on_demand):
            continue
        cards.append(ModelCard(name=entry.name, version=found.version, task=found.task,
                               backend=found.spec.backend.name))
    return cards


def index_rows(registry: ModelRegistry, principal: Principal) -> list[IndexRow]:
    """Every version of every model the caller may see, with its v2 repository state."""
    rows = []
    for entry in registry:
        if not principal.may_use(entry.name):
            continue
        for v in entry.versions.values():
            state, reason = _index_state(v)
            rows.append(IndexRow(name=entry.name, version=v.version, state=state, reason=reason))
    return rows


def _index_state(version: ModelVersion) -> tuple[str, str]:
    if version.serving:
        return "READY", ""
    if version.state == VersionState.LOADING:
        return "LOADING", version.phase
    if version.spec.on_demand and version.state == VersionState.UNLOADED:
        return "UNAVAILABLE", "unloaded; loads on its first request (load = on_demand)"
    return "UNAVAILABLE", version.error or (version.state.value if version.state else "")
