"""Two ingress processes over one Ray namespace: swaps and rollbacks act on the whole cluster,
under load, with no failed request and no request answered by a version it was not admitted
for; a replica killed under load costs no request either."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from conftest import Ingress, StartIngress, replica_pids
from modelyard.testing import wait_until
from modelyard.testing.backends import fake_embedding

MODELS = '''
[[models]]
name = "embed"
version = "1"
backend = "echo"
source = "."
task = "embeddings"
options = { dim = 8 }

[[models]]
name = "embed"
version = "2"
backend = "echo"
source = "."
task = "embeddings"
options = { dim = 8, salt = "v2:" }

[[models]]
name = "chat"
backend = "echo"
source = "."
task = "chat"
replicas = 2
'''

#: The embedding of "x" by version: the replica that computed an answer shows in it.
EMBEDDING = {"1": fake_embedding("x", 8), "2": fake_embedding("v2:x", 8)}


@dataclass
class Outcome:
    ingress: int
    at: float
    status: int
    version: str | None
    embedding: list[float] | None


@dataclass
class Load:
    """Client threads sending requests to each ingress until stopped."""

    ingresses: list[Ingress]
    body: dict[str, object]
    path: str
    threads_per_ingress: int = 2
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for i, ingress in enumerate(self.ingresses):
            for _ in range(self.threads_per_ingress):
                thread = threading.Thread(target=self._run, args=(i, ingress), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, i: int, ingress: Ingress) -> None:
        with ingress.client() as http:
            while not self._stop.is_set():
                try:
                    r = http.post(self.path, json=self.body)
                except httpx.HTTPError:
                    self.outcomes.append(Outcome(i, time.monotonic(), 0, None, None))
                    continue
                embedding = None
                if r.status_code == 200 and self.path.endswith("embeddings"):
                    embedding = r.json()["data"][0]["embedding"]
                self.outcomes.append(Outcome(
                    i, time.monotonic(), r.status_code, r.headers.get("x-model-version"),
                    embedding,
                ))

    def count(self) -> int:
        return len(self.outcomes)


@pytest.fixture(scope="module")
def pair(start_ingress: StartIngress) -> Iterator[list[Ingress]]:
    first = start_ingress(MODELS)
    second = start_ingress(MODELS)  # finds the first one's applications running
    yield [first, second]


def _active(ingress: Ingress, model: str) -> str:
    with ingress.client() as http:
        models = http.get("/admin/models").json()["models"]
    return next(m["active_version"] for m in models if m["name"] == model)


def _versions_seen(load: Load, ingress: int, since: float) -> set[str | None]:
    return {o.version for o in load.outcomes if o.ingress == ingress and o.at >= since}


def test_swap_and_rollback_reach_every_ingress_under_load(pair: list[Ingress]) -> None:
    a, b = pair
    assert _active(a, "embed") == _active(b, "embed") == "1"
    with Load(pair, {"model": "embed", "input": "x"}, "/v1/embeddings") as load:
        wait_until(lambda: load.count() > 40, "load on both ingresses")
        with a.client() as http:
            assert http.post("/admin/models/embed/swap", json={"to": "2"}).status_code == 200
        swapped = time.monotonic()
        # B hears of it from the coordinator, not from a poll of A.
        wait_until(lambda: _versions_seen(load, 1, time.monotonic() - 0.2) == {"2"},
                   "ingress B serving version 2", timeout=20)
        switched_b = next(o.at for o in load.outcomes if o.ingress == 1 and o.version == "2")
        with b.client() as http:  # and back, from the other ingress
            assert http.post("/admin/models/embed/rollback").status_code == 200
        wait_until(lambda: _versions_seen(load, 0, time.monotonic() - 0.2) == {"1"},
                   "ingress A back on version 1", timeout=20)
        done = load.count()
        wait_until(lambda: load.count() > done + 20, "more load after the rollback")
    failed = [o for o in load.outcomes if o.status != 200]
    assert failed == [], failed[:5]
    # Every answer came from the version its ingress admitted it for: never a mix.
    mixed = [o for o in load.outcomes if o.embedding != pytest.approx(EMBEDDING[o.version or ""])]
    assert mixed == [], mixed[:3]
    assert switched_b - swapped < 10.0  # bounded: one coordinator round trip, plus loading
    assert _active(a, "embed") == _active(b, "embed") == "1"


def test_a_replica_killed_under_load_fails_no_request(pair: list[Ingress], namespace: str) -> None:
    app = f"{namespace}-chat-1"
    assert len(replica_pids(app)) == 2
    body = {"model": "chat", "messages": [{"role": "user", "content": "still here"}]}
    with Load(pair, body, "/v1/chat/completions") as load:
        wait_until(lambda: load.count() > 40, "load on both ingresses")
        victim = replica_pids(app)[0]
        os.kill(victim, signal.SIGKILL)
        killed = load.count()
        wait_until(lambda: load.count() > killed + 100, "requests after the kill", timeout=60)
        # Ray replaces the replica.
        wait_until(lambda: len(replica_pids(app)) == 2 and victim not in replica_pids(app),
                   "a new replica", timeout=120, interval=0.5)
    failed = [o for o in load.outcomes if o.status != 200]
    assert failed == [], failed[:5]
    with pair[0].client() as http:
        assert http.get("/v2/health/ready").status_code == 200


def test_stopping_every_ingress_leaves_nothing_running(
    pair: list[Ingress], namespace: str, ray_address: str
) -> None:
    for ingress in pair:  # SIGTERM: each drains, releases its versions and leaves
        ingress.stop()
        # uvicorn re-raises the SIGTERM it handled once shut down (-15); Ray's own handler
        # used to abort the drain after 3 s instead (-6, SIGABRT).
        assert ingress.process.returncode in (0, -signal.SIGTERM), ingress.log.read_text()[-3000:]
        assert "Application shutdown complete" in ingress.log.read_text()
    for app in ("embed-1", "embed-2", "chat-1"):
        assert replica_pids(f"{namespace}-{app}") == []
    probe = subprocess.run([sys.executable, "-c", (
        "import ray\n"
        f"ray.init(address='{ray_address}', namespace='{namespace}', log_to_driver=False)\n"
        "try:\n"
        "    actor = ray.get_actor('modelyard-coordinator')\n"
        "    ray.get(actor.running.remote([]), timeout=60)\n"
        "    print('alive')\n"
        "except (ValueError, ray.exceptions.RayActorError):\n"  # unknown, or exited
        "    print('gone')\n"
    )], capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip().splitlines()[-1] == "gone", probe.stderr[-2000:]
