"""``EventBus``: typed server events pushed to in-process subscribers (no HTTP here).

Publishers (deployments, the loader, breakers, batch jobs) call :meth:`EventBus.publish`,
which never blocks and never raises: each subscriber has a bounded buffer, and one that falls
behind by a whole buffer is dropped (``Subscription.dropped``) instead of slowing the server
or the other subscribers. The API layer turns a subscription into a WebSocket
(``GET /v1/events``, see docs/events.md).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec

__all__ = [
    "BatchCompleted",
    "BatchProgress",
    "BreakerChanged",
    "CanaryChanged",
    "Event",
    "EventBus",
    "EVENT_KINDS",
    "LoadProgress",
    "ModelRolledBack",
    "ModelSwapped",
    "Subscription",
    "VersionStateChanged",
]

log = logging.getLogger(__name__)


class _Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    """Fields every event has; ``seq`` and ``at`` are stamped by the bus on publish."""

    #: The model the event is about ("" for none); RBAC filters on it.
    model: str = ""
    #: Publication order on this server, from 1; a gap means the subscriber missed events.
    seq: int = 0
    #: Wall-clock time of publication, seconds since the epoch.
    at: float = 0.0


class VersionStateChanged(_Event, frozen=True, kw_only=True, tag="version.state"):
    """A version moved between states (loading, ready, active, deprecated, failed, unloaded)."""

    version: str
    old: str | None
    new: str
    error: str = ""


class LoadProgress(_Event, frozen=True, kw_only=True, tag="load.progress"):
    """How far a version's load is: 0-100 and the phase it is in."""

    version: str
    percent: float
    phase: str


class ModelSwapped(_Event, frozen=True, kw_only=True, tag="model.swap"):
    """A swap made ``to_version`` active."""

    from_version: str | None
    to_version: str


class ModelRolledBack(_Event, frozen=True, kw_only=True, tag="model.rollback"):
    """A rollback made the previously active version active again."""

    from_version: str | None
    to_version: str


class CanaryChanged(_Event, frozen=True, kw_only=True, tag="canary"):
    """A canary started, stopped (or was promoted), or was rolled back by itself."""

    action: Literal["started", "stopped", "rolled_back"]
    version: str
    percent: float
    reason: str = ""


class BreakerChanged(_Event, frozen=True, kw_only=True, tag="breaker.state"):
    """A version's circuit breaker changed state (closed, open, half_open)."""

    version: str
    old: str
    new: str


class BatchProgress(_Event, frozen=True, kw_only=True, tag="batch.progress"):
    """Lines done so far in a batch job; ``owner`` is the principal id that created it."""

    batch_id: str
    owner: str
    status: str
    completed: int
    failed: int
    total: int


class BatchCompleted(_Event, frozen=True, kw_only=True, tag="batch.completed"):
    """A batch job reached a final status (completed, failed, cancelled, expired)."""

    batch_id: str
    owner: str
    status: str
    completed: int
    failed: int
    total: int


Event = (
    VersionStateChanged | LoadProgress | ModelSwapped | ModelRolledBack | CanaryChanged
    | BreakerChanged | BatchProgress | BatchCompleted
)
_EVENT_TYPES: tuple[type[_Event], ...] = (
    VersionStateChanged, LoadProgress, ModelSwapped, ModelRolledBack, CanaryChanged,
    BreakerChanged, BatchProgress, BatchCompleted,
)
#: Every event kind (the ``kind`` member of its JSON).
EVENT_KINDS: frozenset[str] = frozenset(str(t.__struct_config__.tag) for t in _EVENT_TYPES)

Accept = Callable[[Event], bool]


def kind_of(event: Event) -> str:
    """The ``kind`` tag of an event (``"version.state"``, ``"load.progress"``, ...)."""
    return str(type(event).__struct_config__.tag)


class Subscription:
    """One subscriber's bounded buffer; iterate it, or ``await next()`` until it ends."""

    def __init__(self, bus: EventBus, accept: Accept, buffer: int) -> None:
        self._bus = bus
        self._accept = accept
        self._limit = buffer
        self._queue: collections.deque[Event] = collections.deque()
        self._wake = asyncio.Event()
        self.closed = False
        #: True when the bus dropped this subscriber for falling a whole buffer behind.
        self.dropped = False

    def _offer(self, event: Event) -> None:
        if self.closed:
            return
        try:
            wanted = self._accept(event)
        except Exception:  # a broken filter ends its own subscription, not the publisher
            log.exception("event filter raised; subscription closed")
            self.close()
            return
        if not wanted:
            return
        if len(self._queue) >= self._limit:
            self.dropped = True
            self.close()
            return
        self._queue.append(event)
        self._wake.set()

    async def next(self) -> Event | None:
        """The next event; None once closed (``dropped`` says whether for being slow).

        Events buffered before a drop are not delivered: a dropped subscriber has lost some
        anyway and must resynchronise (read the current state, then subscribe again).
        """
        while not self._queue:
            if self.closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        if self.dropped:
            return None
        return self._queue.popleft()

    async def wait_closed(self) -> None:
        """Return once the subscription is closed (by ``close`` or a drop)."""
        while not self.closed:
            self._wake.clear()
            await self._wake.wait()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.dropped:
            self._queue.clear()
        self._bus._remove(self)
        self._wake.set()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while (event := await self.next()) is not None:
            yield event


class EventBus:
    """Fan-out of events to subscribers; ``publish`` never blocks and is safe from any thread."""

    def __init__(self, *, clock: Callable[[], float] = time.time, buffer: int = 256) -> None:
        self._clock = clock
        self.buffer = buffer
        self._subscribers: list[Subscription] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def subscribe(self, accept: Accept | None = None, *, buffer: int | None = None) -> Subscription:
        """A new subscription to events ``accept`` says yes to (all when None); call it from
        the event loop that will read it."""
        self._loop = asyncio.get_running_loop()
        sub = Subscription(self, accept or (lambda _: True), buffer or self.buffer)
        self._subscribers.append(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> Event:
        """Stamp ``event`` (``seq``, ``at``) and hand it to every subscriber; returns it."""
        with self._lock:  # publishers on worker threads (a download's progress) share seq
            self._seq += 1
            stamped = msgspec.structs.replace(event, seq=self._seq, at=self._clock())
        loop = self._loop
        if loop is None or not self._subscribers:
            return stamped
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._deliver(stamped)
        elif not loop.is_closed():
            loop.call_soon_threadsafe(self._deliver, stamped)
        return stamped

    def _deliver(self, event: Event) -> None:
        for sub in list(self._subscribers):
            sub._offer(event)

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)

    def close(self) -> None:
        """End every subscription (server shutdown)."""
        for sub in list(self._subscribers):
            sub.close()
