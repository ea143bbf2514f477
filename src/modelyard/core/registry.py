"""Model name -> versions, each with its state and backend instance."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from msgspec import Struct

from modelyard.core.breaker import CircuitBreaker
from modelyard.core.errors import ModelNotFoundError, ModelNotReadyError
from modelyard.core.settings import ModelSpec
from modelyard.core.types import Task

if TYPE_CHECKING:
    from modelyard.core.backend import Backend
    from modelyard.core.batching import Batcher

__all__ = ["ModelEntry", "ModelRegistry", "ModelVersion", "VersionHealth", "VersionState"]


class VersionState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    ACTIVE = "active"
    DEPRECATED = "deprecated"
    FAILED = "failed"
    UNLOADED = "unloaded"


SERVING_STATES = frozenset({VersionState.READY, VersionState.ACTIVE, VersionState.DEPRECATED})


class VersionHealth(Struct, frozen=True, kw_only=True):
    """The last probe of a version (warm-up, swap safety or periodic): its verdict and when."""

    ok: bool
    #: Wall-clock time of the probe, seconds since the epoch.
    checked_at: float
    detail: str = ""


class ModelVersion:
    """One loaded (or loading, or failed) version of a model."""

    def __init__(
        self,
        spec: ModelSpec,
        on_state: Callable[[ModelVersion, VersionState | None, VersionState], None],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.task: Task | None = spec.task
        self.backend: Backend | None = None
        self.batcher: Batcher | None = None
        self.error: str = ""
        #: blake3 of the weight files (set at load when the response cache is on).
        self.weights_digest: str = ""
        self.progress: float = 0.0
        self.phase: str = "queued"
        #: The last probe's verdict; None until the version is first probed.
        self.health: VersionHealth | None = None
        #: What the backend reported holding at its last load (kept after an unload, as the
        #: estimate for the next load); see ``held_bytes`` for what it holds now.
        self.memory_bytes = 0
        #: Requests being served (from the router's pick to the answer or the stream's end):
        #: a version with any is never evicted.
        self.in_flight = 0
        #: Requests waiting for this version's on-demand load (they hold it too).
        self.waiting = 0
        #: When the last request ended (or the version loaded): the keep-alive and LRU clock.
        self.last_used = clock()
        self._clock = clock
        self._state: VersionState | None = None
        self._on_state = on_state
        self.breaker = CircuitBreaker(
            f"model {spec.name!r} version {spec.version!r}", spec.breaker, clock=clock
        )

    @property
    def state(self) -> VersionState | None:
        return self._state

    def set_state(self, new: VersionState, *, error: str = "") -> None:
        old, self._state = self._state, new
        if error:
            self.error = error
        if old != new:
            self._on_state(self, old, new)

    def record_health(self, ok: bool, detail: str, checked_at: float) -> None:
        self.health = VersionHealth(ok=ok, checked_at=checked_at, detail=detail)

    @property
    def serving(self) -> bool:
        return self._state in SERVING_STATES and self.backend is not None

    @property
    def held_bytes(self) -> int:
        """The memory this version holds now: its last report while loaded, else 0."""
        return self.memory_bytes if self.backend is not None else 0

    def begin_request(self) -> None:
        """A request is served by this version from now (it cannot be evicted meanwhile)."""
        self.in_flight += 1

    def end_request(self) -> None:
        self.in_flight -= 1
        self.last_used = self._clock()


class ModelEntry:
    """All versions of one model name and which one is active."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.versions: dict[str, ModelVersion] = {}
        self.active_version: str | None = None
        self.required = False

    @property
    def active(self) -> ModelVersion | None:
        if self.active_version is None:
            return None
        return self.versions.get(self.active_version)


class ModelRegistry:
    """Holds every model entry; lookups raise the client-facing errors."""

    def __init__(self) -> None:
        self._models: dict[str, ModelEntry] = {}

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(sorted(self._models.values(), key=lambda m: m.name))

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFoundError(f"model {name!r} does not exist") from None

    def add(self, version: ModelVersion) -> ModelEntry:
        entry = self._models.setdefault(version.name, ModelEntry(version.name))
        entry.versions[version.version] = version
        # Readiness never waits for an on-demand model: it loads when asked for.
        entry.required = entry.required or (version.spec.required and not version.spec.on_demand)
        return entry

    def remove(self, name: str, version: str) -> None:
        entry = self.entry(name)
        entry.versions.pop(version, None)
        if entry.active_version == version:
            entry.active_version = None
        if not entry.versions:
            del self._models[name]

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """The version that serves ``name`` (the active one unless ``version`` is given)."""
        entry = self.entry(name)
        if version is None:
            # Before its first activation, report the version meant to serve (loading, failed
            # and why) rather than a bare "no active version".
            found = entry.active or next(
                (v for v in entry.versions.values() if v.spec.active), None
            )
            if found is None:
                raise ModelNotReadyError(f"model {name!r} has no active version yet", retry_after=5)
        else:
            try:
                found = entry.versions[version]
            except KeyError:
                raise ModelNotFoundError(f"model {name!r} has no version {version!r}") from None
        if not found.serving:
            state = found.state.value if found.state else "unknown"
            reason = f": {found.error}" if found.error else ""
            raise ModelNotReadyError(
                f"model {name!r} version {found.version!r} is {state}{reason}", retry_after=5
            )
        return found
