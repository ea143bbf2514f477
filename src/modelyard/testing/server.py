"""Run a real uvicorn server on 127.0.0.1 in a background thread, for client tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from litestar import Litestar

__all__ = ["LiveServer", "run_live_server"]


@dataclass
class LiveServer:
    host: str
    port: int
    app: Litestar

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def run_live_server(
    app: Litestar, *, host: str = "127.0.0.1", startup_timeout: float = 30.0
) -> Iterator[LiveServer]:
    """Serve ``app`` until the block ends; waits for the socket to accept, not for a timer."""
    port = _free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    exit_codes: list[object] = []

    def serve() -> None:
        try:
            server.run()
        except SystemExit as exc:  # uvicorn's answer to a failed startup; keep it off the thread
            exit_codes.append(exc.code)

    thread = threading.Thread(target=serve, name="modelyard-live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive():
            code = f" (exit code {exit_codes[0]})" if exit_codes else ""
            raise RuntimeError(f"live server exited during startup{code}; see its log")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("live server did not start in time")
        time.sleep(0.01)
    try:
        yield LiveServer(host, port, app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
