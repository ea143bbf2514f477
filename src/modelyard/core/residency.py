"""``Residency``: which on-demand versions are loaded, within the server's memory budget.

A request for an unloaded on-demand version loads it; concurrent requests for it wait on the
one load. Before a load the budget (``server.memory_budget_bytes``, ``max_loaded_models``) is
made to fit by evicting idle on-demand versions, least recently used first; a version with
requests in flight or waiting, a pinned one and a startup one are never evicted, and when
the budget cannot be met the request gets 503 with ``Retry-After``. A background task unloads
on-demand versions idle for their ``keep_alive_s``, on the injected clock and sleeper.

What a version holds is its backend's ``memory_bytes()`` figure, measured after each load; the
next load of the same version reserves that figure beforehand (nothing, the first time, so
a first load is checked against the budget again once its size is known).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

from modelyard.core.batching import Clock
from modelyard.core.errors import (
    ModelNotReadyError,
    ModelyardError,
    ServiceUnavailableError,
    UnsupportedTaskError,
)
from modelyard.core.probes import Sleeper
from modelyard.core.registry import ModelRegistry, ModelVersion, VersionState
from modelyard.core.routing import serves
from modelyard.core.settings import ServerSettings
from modelyard.core.telemetry import Telemetry
from modelyard.core.types import StreamChunk, Task
from modelyard.core.views import MemoryView

if TYPE_CHECKING:
    from modelyard.core.deployments import Deployments

__all__ = ["HeldStream", "Residency"]

log = logging.getLogger(__name__)

#: After a failed on-demand load, requests get its reason for this long before the next try,
#: so a broken model is not reloaded (evicting others for it) on every request.
FAILED_LOAD_BACKOFF_S = 5.0
#: Retry-After when no room can be made now: the busy models' requests are usually short.
NO_ROOM_RETRY_AFTER_S = 2.0
#: Retry-After when a request gave up waiting for a load that goes on.
STILL_LOADING_RETRY_AFTER_S = 5.0
#: The keep-alive task looks at least this far apart (keep_alive_s = 0: "soon after idle").
REAP_MIN_INTERVAL_S = 1.0


class _NoRoom(Exception):
    """The budget cannot be met even after evicting every idle version."""


class Residency:
    """Loads on-demand versions when asked for and unloads them to stay within the budget."""

    def __init__(
        self,
        settings: ServerSettings,
        registry: ModelRegistry,
        deployments: Deployments,
        telemetry: Telemetry,
        *,
        on_demand: frozenset[str],
        clock: Clock,
        sleep: Sleeper = asyncio.sleep,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._deployments = deployments
        self._telemetry = telemetry
        #: Model names with an on-demand version: every other name skips this at once.
        self.models = on_demand
        self._clock = clock
        self._sleep = sleep
        self._loads: dict[ModelVersion, asyncio.Task[ServiceUnavailableError | None]] = {}
        #: Bytes set aside for loads under way, counted as held until they finish.
        self._reserved: dict[ModelVersion, int] = {}
        self._failed_at: dict[ModelVersion, float] = {}
        self._admission = asyncio.Lock()
        self._reaping: asyncio.Task[None] | None = None
        telemetry.memory_limits(settings.memory_budget_bytes, settings.max_loaded_models)

    # -- the request path ------------------------------------------------------------------

    def target(self, model: str, version: str | None) -> ModelVersion | None:
        """The on-demand version a request for ``model`` (and ``version``) would be served by."""
        if model not in self.models or model not in self._registry:
            return None
        entry = self._registry.entry(model)
        if version is not None:
            found = entry.versions.get(version)
        else:
            found = entry.active or next(
                (v for v in entry.versions.values() if v.spec.active), None
            )
        return found if found is not None and found.spec.on_demand else None

    async def ensure(self, model: str, version: str | None, task: Task | None = None) -> None:
        """Load the on-demand version a request needs unless it serves already.

        Returns once it serves; raises 503 (with ``Retry-After``) when it failed to load, no
        room could be made, or it still loads after ``server.load_timeout_s``.
        """
        found = self.target(model, version)
        if found is None or found.serving:
            return
        if task is not None and found.task is not None and not serves(found, task):
            # Known not to serve the task: 400 without a load (the router's own words).
            raise UnsupportedTaskError(
                f"model {model!r} serves {found.task.value}, not {task.value}"
            )
        await self.load(found)

    async def load(self, version: ModelVersion) -> None:
        """Load ``version`` within the budget, joining a load of it already under way."""
        if version.serving:
            return
        self._check_backoff(version)
        task = self._loads.get(version)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._load(version), name=f"modelyard-load-{version.name}-{version.version}"
            )
            self._loads[version] = task
            task.add_done_callback(lambda done: self._load_done(version, done))
        version.waiting += 1  # waiting requests hold the version: it is not evicted under them
        started = self._clock()
        try:
            refusal = await self._wait(version, task)
        finally:
            version.waiting -= 1
            self._telemetry.load_waited(version, self._clock() - started)
        if refusal is not None:  # each waiter gets an error of its own
            raise type(refusal)(refusal.detail, headers=refusal.headers)

    def _load_done(
        self, version: ModelVersion, task: asyncio.Task[ServiceUnavailableError | None]
    ) -> None:
        if self._loads.get(version) is task:
            del self._loads[version]

    async def _wait(
        self, version: ModelVersion, task: asyncio.Task[ServiceUnavailableError | None]
    ) -> ServiceUnavailableError | None:
        """The load's refusal, or None once it serves; gives up after the load timeout."""
        timeout = self._settings.load_timeout_s
        timer: asyncio.Future[None] = asyncio.ensure_future(self._sleep(timeout))
        try:
            # Not wait_for: a caller that leaves (or times out) must not cancel the shared load.
            either: set[asyncio.Future[Any]] = {task, timer}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            timer.cancel()
        what = f"model {version.name!r} version {version.version!r}"
        if not task.done():
            return ModelNotReadyError(
                f"{what} is still loading after {timeout:g}s (server.load_timeout_s); the "
                "load goes on, retry shortly", retry_after=STILL_LOADING_RETRY_AFTER_S,
            )
        if task.cancelled():
            return ServiceUnavailableError("the server is stopping")
        refusal = task.result()
        if refusal is None and not version.serving:  # unloaded (an admin) before this woke
            return ModelNotReadyError(f"{what} was unloaded; retry", retry_after=1)
        return refusal

    def _check_backoff(self, version: ModelVersion) -> None:
        failed_at = self._failed_at.get(version)
        if failed_at is None:
            return
        left = failed_at + FAILED_LOAD_BACKOFF_S - self._clock()
        if left <= 0:
            del self._failed_at[version]
            return
        raise ModelNotReadyError(
            f"model {version.name!r} version {version.version!r} failed to load: "
            f"{version.error or 'unknown reason'}", retry_after=left,
        )

    async def _load(self, version: ModelVersion) -> ServiceUnavailableError | None:
        """Make room, load, check the measured size; None when it serves, else why not."""
        try:
            async with self._admission:
                await self._make_room(version, version.memory_bytes)
                self._reserved[version] = version.memory_bytes
            try:
                await self._deployments.load_on_demand(version)
            finally:
                self._reserved.pop(version, None)
            if not version.serving:
                self._failed_at[version] = self._clock()
                return ModelNotReadyError(
                    f"model {version.name!r} version {version.version!r} failed to load: "
                    f"{version.error or 'unknown reason'}", retry_after=FAILED_LOAD_BACKOFF_S,
                )
            self._failed_at.pop(version, None)
            async with self._admission:  # its real size is known only now
                await self._make_room(version, 0)
            return None
        except _NoRoom as exc:
            if version.serving:  # loaded to learn its size, and it does not fit
                await self._deployments.evict(version, lambda v: True)
            return ServiceUnavailableError(str(exc), retry_after=NO_ROOM_RETRY_AFTER_S)
        except ModelyardError as exc:
            return ServiceUnavailableError(exc.detail)
        except Exception:  # a bug here must reach the log, not hang or crash the waiters
            log.exception("on-demand load of %s:%s failed", version.name, version.version)
            return ServiceUnavailableError(
                f"model {version.name!r} version {version.version!r} could not be loaded"
            )

    # -- the budget ---------------------------------------------------------------------------

    async def _make_room(self, version: ModelVersion, estimate: int) -> None:
        """Evict idle versions, least recently used first, until ``version`` fits."""
        while True:
            victims = self._plan(version, estimate)
            if not victims:
                return
            evicted = 0
            for victim in victims:
                if await self._deployments.evict(victim, self._idle):
                    evicted += 1
                    log.info("evicted %s:%s to load %s:%s", victim.name, victim.version,
                             version.name, version.version)
                    self._telemetry.model_evicted(victim, "budget")
            if not evicted:  # each became busy meanwhile; never spin on the same plan
                raise _NoRoom(self._no_room(version, *self._demand(version, estimate)))

    def _plan(self, version: ModelVersion, estimate: int) -> list[ModelVersion]:
        """The versions to evict for ``version`` (needing ``estimate`` bytes) to fit."""
        count, used, need = self._demand(version, estimate)
        others = (v for v in self._versions() if v is not version and self._occupies(v))
        idle = sorted((v for v in others if self._evictable(v)), key=lambda v: v.last_used)
        victims: list[ModelVersion] = []
        while self._over(count, used):
            if not idle:
                raise _NoRoom(self._no_room(version, *self._demand(version, estimate)))
            victim = idle.pop(0)
            victims.append(victim)
            count, used = count - 1, used - self._bytes(victim)
        return victims

    def _demand(self, version: ModelVersion, estimate: int) -> tuple[int, int, int]:
        """Versions loaded and bytes held with ``version`` loaded too, and what it needs."""
        others = [v for v in self._versions() if v is not version and self._occupies(v)]
        need = version.held_bytes or estimate
        return len(others) + 1, sum(self._bytes(v) for v in others) + need, need

    def _over(self, count: int, used: int) -> bool:
        most, budget = self._settings.max_loaded_models, self._settings.memory_budget_bytes
        return (most is not None and count > most) or (budget is not None and used > budget)

    def _no_room(self, version: ModelVersion, count: int, used: int, need: int) -> str:
        most, budget = self._settings.max_loaded_models, self._settings.memory_budget_bytes
        what = f"model {version.name!r} version {version.version!r}"
        if budget is not None and need > budget:
            return (f"{what} needs {need} bytes, more than the whole memory budget "
                    f"({budget} bytes, server.memory_budget_bytes)")
        limits = []
        if most is not None and count > most:
            limits.append(f"{count - 1} of {most} models are loaded (server.max_loaded_models)")
        if budget is not None and used > budget:
            limits.append(f"{used - need} of {budget} bytes are held and it needs {need} "
                          "(server.memory_budget_bytes)")
        return (f"no room to load {what}: {'; '.join(limits)}, and every loaded model is "
                "serving requests or pinned; retry shortly")

    def _versions(self) -> Iterator[ModelVersion]:
        for entry in self._registry:
            yield from entry.versions.values()

    def _occupies(self, version: ModelVersion) -> bool:
        return (
            version.backend is not None or version.state == VersionState.LOADING
            or version in self._reserved
        )

    def _bytes(self, version: ModelVersion) -> int:
        return version.held_bytes or self._reserved.get(version, 0)

    def _evictable(self, version: ModelVersion) -> bool:
        """Idle, and no operation (load, swap, unload) holds its model now."""
        return self._idle(version) and not self._deployments.busy(version.name)

    def _idle(self, version: ModelVersion) -> bool:
        """Loaded, on demand, not pinned, nothing in flight or waiting for it."""
        return (
            version.spec.on_demand and not version.spec.pinned and version.serving
            and version.in_flight == 0 and version.waiting == 0 and version not in self._loads
        )

    # -- keep-alive ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start unloading idle on-demand versions (when any has a keep-alive)."""
        if self._reaping is None and self._keep_alives():
            self._reaping = asyncio.get_running_loop().create_task(
                self._reap_forever(), name="modelyard-keep-alive"
            )

    async def stop(self) -> None:
        """Stop the keep-alive task and every load under way."""
        tasks = [t for t in (self._reaping, *self._loads.values()) if t is not None]
        self._reaping = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _keep_alives(self) -> list[float]:
        return [
            v.spec.keep_alive_s for v in self._versions()
            if v.spec.on_demand and not v.spec.pinned and v.spec.keep_alive_s >= 0
        ]

    async def _reap_forever(self) -> None:
        while True:
            try:
                delay = await self.reap()
            except Exception:  # a bug here must not stop the keep-alive for good
                log.exception("keep-alive round failed")
                delay = REAP_MIN_INTERVAL_S
            await self._sleep(delay)

    async def reap(self) -> float:
        """Unload the versions idle past their keep-alive; seconds until the next may be."""
        now = self._clock()
        due_next = math.inf
        for version in list(self._versions()):
            keep_alive = version.spec.keep_alive_s
            if keep_alive < 0 or not self._evictable(version):
                continue
            due = version.last_used + keep_alive
            if due > now:
                due_next = min(due_next, due)
            elif await self._deployments.evict(version, self._idle):
                log.info("unloaded %s:%s, idle for %gs", version.name, version.version,
                         now - version.last_used)
                self._telemetry.model_evicted(version, "idle")
        # A version loaded while this sleeps is due a whole keep-alive later: the shortest
        # keep-alive bounds the sleep, so none is overlooked for long.
        shortest = min(self._keep_alives(), default=math.inf)
        delay = min(due_next - self._clock(), shortest)
        return max(REAP_MIN_INTERVAL_S, delay) if math.isfinite(delay) else REAP_MIN_INTERVAL_S

    # -- views --------------------------------------------------------------------------------

    def view(self) -> MemoryView:
        loaded = [v for v in self._versions() if v.backend is not None]
        return MemoryView(
            used_bytes=sum(v.held_bytes for v in loaded),
            budget_bytes=self._settings.memory_budget_bytes,
            loaded=len(loaded),
            max_loaded=self._settings.max_loaded_models,
        )


class HeldStream:
    """A stream's chunks, its version held in flight until the stream ends, fails or is closed.

    A class rather than an async generator: one that is dropped unread still lets go of its
    version (``__del__``), where a generator that never started would run no ``finally``.
    """

    def __init__(self, version: ModelVersion, chunks: AsyncIterator[StreamChunk]) -> None:
        self._version: ModelVersion | None = version
        self._chunks = chunks

    def __aiter__(self) -> HeldStream:
        return self

    async def __anext__(self) -> StreamChunk:
        try:
            return await anext(self._chunks)
        except BaseException:  # the end, a failure or a cancellation: the stream is over
            self._let_go()
            raise

    async def aclose(self) -> None:
        self._let_go()
        closer = getattr(self._chunks, "aclose", None)
        if closer is not None:
            await closer()

    def _let_go(self) -> None:
        version, self._version = self._version, None
        if version is not None:
            version.end_request()

    def __del__(self) -> None:
        self._let_go()
