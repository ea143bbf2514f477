"""Drain past the grace period, against a real uvicorn server on 127.0.0.1.

Requests still in flight when ``shutdown_grace_s`` runs out get 503 problem+json with
``Retry-After`` (never uvicorn's bare ``500 Internal Server Error``), no traceback reaches
the log, and a connection still open during the drain reads 503 from ``/v2/health/ready``.
Bounded: a 2 s grace period, every wait has a deadline, and the server and clients stop in
``finally`` whatever happens.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import uvicorn

from modelyard.api.app import create_app
from modelyard.api.exchange import Exchange
from modelyard.api.server import DrainingServer
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import HangingBackend, wait_until

CLIENTS = 10
GRACE_S = 2
CHAT = {"model": "h", "messages": [{"role": "user", "content": "hello"}]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _refuses_new_connections(url: str) -> bool:
    try:
        with httpx.Client(timeout=2) as fresh:
            fresh.get(f"{url}/v2/health/live")
    except httpx.ConnectError:
        return True
    return False


def test_requests_in_flight_past_the_grace_period_get_503_problem_json(
    make_settings: Callable[..., Settings], plugin_host: PluginHost,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    settings = make_settings(
        models=[{"name": "h", "backend": "hanging", "source": ".", "task": "chat"}],
        server={"shutdown_grace_s": GRACE_S},
    )
    service = InferenceService(settings, plugin_host)
    app = create_app(settings, plugins=plugin_host, service=service)
    exchange = app.asgi_handler
    assert isinstance(exchange, Exchange)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = DrainingServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on", log_config=None,
                       timeout_graceful_shutdown=GRACE_S),
        service,
    )
    thread = threading.Thread(target=server.run, name="drain-test-server", daemon=True)
    pool = ThreadPoolExecutor(CLIENTS)
    probe = httpx.Client(base_url=url, timeout=10)  # one kept-alive connection
    backend: HangingBackend | None = None
    try:
        thread.start()
        wait_until(lambda: server.started and service.ready(), "ready")
        assert probe.get("/v2/health/ready").status_code == 200  # opens the connection
        backend = service.registry.get("h").backend  # type: ignore[assignment]
        assert isinstance(backend, HangingBackend)

        def chat() -> httpx.Response:
            return httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=30)

        answers = [pool.submit(chat) for _ in range(CLIENTS)]
        hanging = backend
        wait_until(
            lambda: exchange.in_flight == CLIENTS and bool(hanging.calls), "requests in flight"
        )

        server.handle_exit(signal.SIGTERM, None)
        wait_until(
            lambda: _refuses_new_connections(url), "the listening socket to close",
            timeout=GRACE_S,
        )
        # Still within the grace period: the open connection answers, and says not ready.
        ready = probe.get("/v2/health/ready")
        assert ready.status_code == 503
        assert ready.headers["content-type"].startswith("application/problem+json")
        assert ready.json()["detail"] == "not ready (draining)"
        assert ready.headers["connection"] == "close"

        responses = [future.result(timeout=30) for future in answers]
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        if backend is not None and thread.is_alive():  # a failed test must not hang
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing hangs
                backend.open_gate()
        server.should_exit = True
        thread.join(timeout=30)
        pool.shutdown(wait=True, cancel_futures=True)
        probe.close()

    for response in responses:
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.headers["retry-after"] == "1"
        assert response.headers["x-request-id"]
        body: dict[str, Any] = response.json()
        assert body["status"] == 503
        assert body["type"].endswith("/shutting-down")
        assert body["request_id"] == response.headers["x-request-id"]
    log = caplog.text
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log and "CancelledError" not in log
    assert not [r for r in caplog.records if r.exc_info], "a traceback reached the log"
    assert f"{CLIENTS} request(s) still in flight answered 503" in log
