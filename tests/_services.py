"""Session fixtures for the real services some tests need: Redis, a local Ray instance,
Chromium.

``.ci/run`` installs and starts them and names them in ``TEST_REDIS_URL``,
``TEST_RAY_ADDRESS`` and ``TEST_CHROMIUM``. Without those variables (a
developer's machine) each fixture starts its own from the program on ``PATH``; a missing
program skips the tests that need it, except under ``CI=true``, where it fails them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelyard.testing import wait_until

__all__ = [
    "RedisServer", "chromium_path", "free_port", "ray_address", "redis_url", "start_ray",
    "stop_ray",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _missing(what: str) -> None:
    message = f"{what} is not installed; .ci/run installs it"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class RedisServer:
    """A redis-server (or valkey-server) of the test's own, which a test may stop and start."""

    def __init__(self, program: str, directory: Path) -> None:
        self.program = program
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [self.program, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, f"{self.program} on port {self.port}", timeout=20)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


def _redis_program() -> str | None:
    return shutil.which("valkey-server") or shutil.which("redis-server")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis/Valkey URL shared by the session (flush what you write, or use your own keys)."""
    given = os.environ.get("TEST_REDIS_URL")
    if given:
        yield given
        return
    program = _redis_program()
    if program is None:
        _missing("redis-server (or valkey-server)")
    assert program is not None
    server = RedisServer(program, tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own, for outage tests (``stop()``/``start()``)."""
    program = _redis_program()
    if program is None:
        _missing("redis-server (or valkey-server)")
    assert program is not None
    server = RedisServer(program, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _processes_of(marker: str) -> set[int]:
    """Processes whose command line names ``marker`` (a Ray instance's temp dir), with every
    descendant (workers and agents rename themselves ``ray::...``)."""
    parent: dict[int, int] = {}
    named: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in command:
            named.add(pid)
    found = set(named)
    grew = True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def start_ray(temp: Path, *, port: int) -> str:
    """A Ray head of its own (2 CPUs, no dashboard) keeping its files under ``temp``."""
    ray = Path(sys.executable).with_name("ray")
    subprocess.run(
        [str(ray), "start", "--head", "--port", str(port), "--num-cpus", "2",
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(temp)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180,
    )
    return f"127.0.0.1:{port}"


def stop_ray(temp: Path) -> None:
    """Stop the Ray instance started with ``temp``; unlike ``ray stop``, no other one."""
    for pid in _processes_of(str(temp)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a running local Ray instance (2 CPUs, no dashboard) for the session."""
    given = os.environ.get("TEST_RAY_ADDRESS")
    if given:
        yield given
        return
    if not Path(sys.executable).with_name("ray").exists():
        _missing("ray (pip install 'modelyard[ray]')")
    temp = tmp_path_factory.mktemp("ray")
    try:
        yield start_ray(temp, port=free_port())
    finally:
        stop_ray(temp)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """Debian's chromium, which Playwright launches through ``executable_path``."""
    path = os.environ.get("TEST_CHROMIUM") or shutil.which("chromium")
    if not path:
        _missing("chromium")
    assert path is not None
    return path
