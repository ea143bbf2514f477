"""Ingress processes (``modelyard serve --engine ray``) joined to the session's Ray instance.

Each test module gets its own Ray namespace, so its models, versions and routing are its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modelyard.testing import wait_until

pytest.importorskip("ray.serve")

#: A model's first start over Ray pays for replica processes importing modelyard and Ray.
STARTUP_TIMEOUT_S = 240.0

from _services import free_port  # noqa: E402


@dataclass
class Ingress:
    """One modelyard ingress process."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60.0, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


StartIngress = Callable[[str], Ingress]


def _ready(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"ingress exited ({process.returncode}):\n{log.read_text()[-4000:]}")
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="module")
def start_ingress(
    ray_address: str, namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StartIngress]:
    """``start_ingress(models_toml)``: an ingress serving those ``[[models]]`` over Ray."""
    started: list[Ingress] = []
    directory = tmp_path_factory.mktemp("ingress")

    def start(models: str, *, extra: str = "") -> Ingress:
        port = free_port()
        config = directory / f"ingress-{port}.toml"
        config.write_text(
            f'[server]\nport = {port}\nlog_format = "text"\n\n'
            f'[cluster]\nengine = "ray"\naddress = "{ray_address}"\nnamespace = "{namespace}"\n'
            f"{extra}\n{models}"
        )
        log = directory / f"ingress-{port}.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
        process = subprocess.Popen(
            [sys.executable, "-m", "modelyard", "serve", "--config", str(config)],
            stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
        )
        ingress = Ingress(f"http://127.0.0.1:{port}", process, log)
        started.append(ingress)
        wait_until(lambda: _ready(ingress.url, process, log), f"ingress on port {port}",
                   timeout=STARTUP_TIMEOUT_S, interval=0.25)
        return ingress

    try:
        yield start  # type: ignore[misc]
    finally:
        for ingress in started:
            ingress.stop()


def replica_pids(app: str) -> list[int]:
    """PIDs of the replica processes of Serve application ``app`` (their process title)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if f"ray::ServeReplica:{app}:" in line]
