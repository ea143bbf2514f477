"""Soak helpers: this process's memory and descriptors, and a bounded load of HTTP clients.

The live server of :func:`~modelyard.testing.run_live_server` runs in a thread of the test's
own process, so sampling this process measures the server (and the clients, a constant).
"""

from __future__ import annotations

import asyncio
import collections
import gc
import importlib
import importlib.util
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "LoadReport",
    "ProcessSample",
    "metric_value",
    "process_sampling_available",
    "run_load",
    "sample_process",
]

_PROC = Path("/proc/self")

#: ``await send(client)``: one request of the load.
Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class ProcessSample:
    """This process at one moment (or the difference between two moments)."""

    #: Resident memory.
    rss_bytes: int
    #: Open file descriptors: files, sockets (a connection's two ends count twice in-process).
    open_fds: int
    #: Objects the garbage collector tracks (containers, instances) after a full collection.
    objects: int

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / 2**20

    def growth_since(self, earlier: ProcessSample) -> ProcessSample:
        """What this process gained since ``earlier`` (negative where it shrank)."""
        return ProcessSample(
            self.rss_bytes - earlier.rss_bytes, self.open_fds - earlier.open_fds,
            self.objects - earlier.objects,
        )


def process_sampling_available() -> bool:
    """Whether :func:`sample_process` works here (Linux ``/proc``, or psutil installed)."""
    return (_PROC / "statm").exists() or importlib.util.find_spec("psutil") is not None


def sample_process() -> ProcessSample:
    """Collect garbage, then sample RSS, open descriptors (``/proc``, else psutil) and objects.

    Collecting first makes two samples comparable: what remains is what is still referenced.
    """
    gc.collect()
    objects = len(gc.get_objects())
    if (_PROC / "statm").exists():
        resident_pages = int((_PROC / "statm").read_text().split()[1])
        # listdir holds one descriptor of its own on the directory while it reads: not ours.
        fds = len(os.listdir(_PROC / "fd")) - 1
        return ProcessSample(resident_pages * os.sysconf("SC_PAGE_SIZE"), fds, objects)
    psutil = importlib.import_module("psutil")  # ModuleNotFoundError: nothing to sample with
    process = psutil.Process()
    return ProcessSample(int(process.memory_info().rss), int(process.num_fds()), objects)


def metric_value(scrape: str, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` (exactly these labels) in a ``/metrics`` scrape, or None."""
    for family in text_string_to_metric_families(scrape):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


@dataclass
class LoadReport:
    """What a load got back: statuses, transport errors (resets, timeouts) and one body each."""

    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    #: Transport errors by exception type: connection resets, protocol errors, timeouts.
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The first body seen for each status and the first text of each error, for assertions.
    samples: dict[int | str, str] = field(default_factory=dict)

    @property
    def sent(self) -> int:
        """Requests that finished, with a response or a transport error."""
        return self.statuses.total() + self.errors.total()

    def _response(self, response: httpx.Response) -> None:
        self.statuses[response.status_code] += 1
        self.samples.setdefault(response.status_code, response.text[:300])

    def _error(self, error: httpx.TransportError) -> None:
        name = type(error).__name__
        self.errors[name] += 1
        self.samples.setdefault(name, str(error)[:300])


async def run_load(
    client: httpx.AsyncClient,
    send: Send,
    *,
    clients: int,
    duration_s: float,
    stop: asyncio.Event | None = None,
    abandon_in_flight: bool = False,
) -> LoadReport:
    """``clients`` loops, each sending ``send(client)`` back to back, for ``duration_s``.

    The load ends after ``duration_s`` or once ``stop`` is set, whichever comes first. Each
    loop finishes its request in flight then, unless ``abandon_in_flight``: then those
    requests are cancelled (their clients leave, as a client gone away would) and not counted.
    Give ``client`` at least ``clients`` connections, or loops wait for one another.
    """
    report = LoadReport()
    deadline = time.monotonic() + duration_s
    finished = asyncio.Event()
    stopped = stop if stop is not None else asyncio.Event()

    async def loop() -> None:
        while not (finished.is_set() or stopped.is_set()) and time.monotonic() < deadline:
            try:
                report._response(await send(client))
            except httpx.TransportError as exc:
                report._error(exc)

    loops = [asyncio.create_task(loop(), name=f"load-{i}") for i in range(clients)]
    watch_stop = asyncio.create_task(stopped.wait())
    try:
        # A loop ends before the deadline only on a bug in ``send``; the load ends then too.
        await asyncio.wait([*loops, watch_stop], timeout=duration_s,
                           return_when=asyncio.FIRST_COMPLETED)
        finished.set()
        if not abandon_in_flight:
            await asyncio.wait(loops)  # each loop ends after the request it is sending
    finally:
        for task in (*loops, watch_stop):
            task.cancel()
        await asyncio.gather(*loops, watch_stop, return_exceptions=True)
    for task in loops:
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    return report
