"""Swap churn: 20 cycles of add a version → ready → swap → unload the old, with traffic.

Over HTTP against a real server on 127.0.0.1, fake backends only: four clients send chat
requests back to back while an operator's script cycles the model through 21 versions. Each
new version answers its warm-up probe and the swap's probe before it takes traffic; the old
one is unloaded right after the swap, while requests it admitted may still be inside it:
by the script (``DELETE``, as a deploy script would) or by the swap itself
(``server.keep_deprecated = 0``). Bounded: the load stops itself when the cycles end (60 s
at most) and every poll has a deadline.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.backend import Backend
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import (
    LiveServer,
    process_sampling_available,
    run_live_server,
    run_load,
    sample_process,
)

pytestmark = pytest.mark.skipif(
    not process_sampling_available(), reason="needs /proc or psutil to sample memory"
)

CYCLES = 20
CLIENTS = 4
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}]}
#: Resident memory cycles 6-20 may add. A version of the fake backend is a few KiB of Python
#: objects (its batcher, breaker and metric children), far below what RSS can resolve; the
#: bound catches what a leaked version of a real backend would hold (a thread pool, buffers)
#: and the check on live backends below catches the small leak.
RSS_GROWTH_MIB = 8
#: Descriptors cycles 6-20 may add: none are opened per version; the load's and the admin
#: client's pooled connections are all open by cycle 5. One spare for a reconnect.
FD_GROWTH = 2


@dataclass
class Live:
    server: LiveServer
    service: InferenceService
    source: str
    #: Whether the script unloads the old version (else the swap does).
    unload_old: bool

    def backend(self, version: str) -> Backend:
        # Read from the test's thread: an attribute lookup, nothing changes.
        backend = self.service.registry.entry("m").versions[version].backend
        assert backend is not None, f"version {version} holds no backend"
        return backend


@pytest.fixture(params=["unload-the-old", "keep-none-deprecated"])
def live(
    request: pytest.FixtureRequest, plugin_host: PluginHost,
    make_settings: Callable[..., Settings], tmp_path: Path,
) -> Iterator[Live]:
    keep = 1 if request.param == "unload-the-old" else 0
    # An empty folder for a source: the fakes read nothing, and a load sizes its files.
    settings = make_settings(
        models=[{
            "name": "m", "backend": "slow", "source": str(tmp_path), "task": "chat",
            "options": {"delay_s": 0.002},
        }],
        server={"keep_deprecated": keep},
    )
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    with run_live_server(app) as server:
        deadline = time.monotonic() + 30
        while not service.ready():  # loading happens in the server's own loop
            assert time.monotonic() < deadline, "the live server never became ready"
            time.sleep(0.01)
        yield Live(server, service, str(tmp_path), unload_old=keep > 0)


async def test_twenty_swap_cycles_under_load_fail_nothing_and_leak_nothing(live: Live) -> None:
    answered_by: set[str] = set()

    async def chat(client: httpx.AsyncClient) -> httpx.Response:
        response = await client.post("/v1/chat/completions", json=CHAT)
        answered_by.add(response.headers.get("x-model-version", "?"))
        return response

    backends = [weakref.ref(live.backend("1"))]
    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with (
        httpx.AsyncClient(base_url=live.server.url, timeout=10, limits=limits) as client,
        httpx.AsyncClient(base_url=live.server.url, timeout=10) as admin,
    ):
        stop = asyncio.Event()
        load = asyncio.create_task(
            run_load(client, chat, clients=CLIENTS, duration_s=60, stop=stop)
        )
        try:
            for cycle in range(1, CYCLES + 1):
                old, new = str(cycle), str(cycle + 1)
                await _add_ready_version(admin, new, live.source)
                backends.append(weakref.ref(live.backend(new)))
                await _swap(admin, new, old if live.unload_old else None)
                await _until_it_answers(new, answered_by)
                if cycle == 5:
                    early = sample_process()
            late = sample_process()
        finally:
            stop.set()
            report = await load

    assert not report.errors, (report.errors, report.samples)
    assert set(report.statuses) == {200}, (report.statuses, report.samples)
    assert answered_by == {str(v) for v in range(1, CYCLES + 2)}

    grown = late.growth_since(early)
    assert grown.rss_mib < RSS_GROWTH_MIB, f"RSS grew {grown.rss_mib:.1f} MiB in cycles 6-20"
    assert grown.open_fds <= FD_GROWTH, f"{grown.open_fds} more open descriptors in cycles 6-20"
    # Unloaded versions are gone for good: nothing holds on to their backends.
    gc.collect()
    alive = [ref() for ref in backends if ref() is not None]
    assert alive == [live.backend(str(CYCLES + 1))], f"{len(alive)} backends alive"


async def _add_ready_version(admin: httpx.AsyncClient, version: str, source: str) -> None:
    r = await admin.post("/admin/models/m/versions", json={"version": version, "source": source})
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 10
    while True:
        view: dict[str, Any] = (await admin.get(r.headers["location"])).json()
        if view["state"] != "loading":
            break
        assert time.monotonic() < deadline, f"version {version} never left loading: {view}"
        await asyncio.sleep(0.005)
    assert view["state"] == "ready", view  # it answered its warm-up probe


async def _swap(admin: httpx.AsyncClient, new: str, unload: str | None) -> None:
    r = await admin.post("/admin/models/m/swap", json={"to": new})
    assert r.status_code == 200, r.text
    assert {c["name"]: c["ok"] for c in r.json()["report"]["checks"]}["probe"] is True
    if unload is not None:
        r = await admin.delete(f"/admin/models/m/versions/{unload}")
        assert r.status_code == 200, r.text


async def _until_it_answers(version: str, answered_by: set[str]) -> None:
    """Wait (10 s at most) until the load has had an answer from ``version``."""
    deadline = time.monotonic() + 10
    while version not in answered_by:
        assert time.monotonic() < deadline, f"version {version} never answered the load"
        await asyncio.sleep(0.005)
