"""SIGTERM: readiness turns 503 at once, in-flight requests finish, the process exits in time;
what is still running when the grace period ends gets 503 problem+json from the exchange layer
(tests/reliability/test_drain.py runs that end to end)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from modelyard.api.app import create_app
from modelyard.api.exchange import Exchange
from modelyard.api.server import DrainingServer
from modelyard.core.metrics import Metrics
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.telemetry import Telemetry
from modelyard.testing import wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_exit_signal_drains_in_flight_requests(make_settings, plugin_host: PluginHost) -> None:
    settings = make_settings(models=[{"name": "h", "backend": "hanging", "source": ".",
                                      "task": "embeddings"}])
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    port = _free_port()
    server = DrainingServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                       timeout_graceful_shutdown=10),
        service,
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started and service.ready(), "ready")
    results: list[int] = []

    def in_flight() -> None:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"model": "h", "input": "x"},
                       timeout=30)
        results.append(r.status_code)

    client = threading.Thread(target=in_flight)
    client.start()
    backend = service.registry.get("h").backend
    wait_until(lambda: backend.calls == [1], "the request to reach the backend")
    server.handle_exit(signal.SIGTERM, None)
    assert service.ready() is False  # at once, before anything has drained
    assert thread.is_alive()  # still serving the in-flight request
    backend.open_gate()
    client.join(timeout=30)
    thread.join(timeout=30)
    assert results == [200]
    assert not thread.is_alive()


def test_sigterm_ends_the_cli_server_within_the_grace_period(tmp_path: Path) -> None:
    config = tmp_path / "modelyard.toml"
    port = _free_port()
    config.write_text(textwrap.dedent(f"""
        [server]
        port = {port}
        shutdown_grace_s = 5
        [[models]]
        name = "echo"
        backend = "echo"
        source = "."
        task = "chat"
    """))
    env = {k: v for k, v in os.environ.items() if k != "MODELYARD_PLUGINS"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "--config", str(config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                return False

        wait_until(ready, "the CLI server to become ready", timeout=60)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        elapsed = time.monotonic() - started
        output = proc.stdout.read().decode() if proc.stdout else ""
        # uvicorn re-raises the signal once its graceful shutdown is done, so the exit status
        # is "terminated by SIGTERM" (-15) after a clean drain; a crash would be another code.
        assert code in (0, -signal.SIGTERM), output
        assert "Finished server process" in output
        assert "Traceback" not in output
        assert elapsed < 5
    finally:
        if proc.poll() is None:
            proc.kill()


# -- the exchange layer's part: Connection: close during the drain, 503 at its end -------------


class _Client:
    """A scripted ASGI server side: no body, then waits; records what the app sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.left = asyncio.Event()
        self.body_read = False

    async def receive(self) -> dict[str, object]:
        if not self.body_read:
            self.body_read = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, object]) -> None:
        self.sent.append(message)

    def header(self, name: bytes) -> bytes | None:
        start = self.sent[0]
        assert start["type"] == "http.response.start"
        found = [v for k, v in start["headers"] if k == name]  # type: ignore[attr-defined]
        return found[0] if found else None


def _scope(path: str = "/v1/chat/completions") -> dict[str, object]:
    return {"type": "http", "method": "POST", "path": path, "headers": []}


def _exchange(app: object) -> Exchange:
    return Exchange(app, Telemetry(metrics=Metrics(process=False)))  # type: ignore[arg-type]


async def _until(condition: object) -> None:
    for _ in range(10_000):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_a_request_cut_off_by_the_drain_gets_503_problem_json() -> None:
    entered = asyncio.Event()

    async def hangs(scope: object, receive: object, send: object) -> None:
        entered.set()
        await asyncio.Event().wait()

    layer, client = _exchange(hangs), _Client()
    call = asyncio.ensure_future(layer(_scope(), client.receive, client.send))  # type: ignore[arg-type]
    await entered.wait()
    assert layer.in_flight == 1
    layer.begin_drain()
    assert layer.abort_in_flight() == 1
    await asyncio.wait_for(call, 5)  # ends quietly: no CancelledError for the server to log

    start, end = client.sent
    assert start["status"] == 503
    assert client.header(b"content-type") == b"application/problem+json"
    assert client.header(b"retry-after") == b"1"
    assert client.header(b"connection") == b"close"
    body = json.loads(end["body"])  # type: ignore[arg-type]
    assert body["status"] == 503 and body["type"].endswith("/shutting-down")
    assert body["request_id"] == client.header(b"x-request-id").decode()  # type: ignore[union-attr]
    assert layer.in_flight == 0


async def test_a_stream_cut_off_by_the_drain_is_ended_where_it_is() -> None:
    async def streams(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})  # type: ignore[operator]
        await asyncio.Event().wait()

    layer, client = _exchange(streams), _Client()
    call = asyncio.ensure_future(layer(_scope(), client.receive, client.send))  # type: ignore[arg-type]
    await _until(lambda: len(client.sent) == 2)
    assert layer.abort_in_flight() == 1
    await asyncio.wait_for(call, 5)
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_during_a_drain_every_response_closes_its_connection() -> None:
    async def answers(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    layer = _exchange(answers)
    before = _Client()
    await layer(_scope("/v2/health/ready"), before.receive, before.send)  # type: ignore[arg-type]
    layer.begin_drain()
    during = _Client()
    await layer(_scope("/v2/health/ready"), during.receive, during.send)  # type: ignore[arg-type]
    assert before.header(b"connection") is None
    assert during.header(b"connection") == b"close"
    assert layer.abort_in_flight() == 0  # nothing left to cut off
