"""WebSockets against a real server: /v1/events (order, auth, RBAC, slow consumers) and the
chat stream (chunks, final usage, cancellation by closing the socket)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from modelyard import hookimpl
from modelyard.api.app import create_app
from modelyard.api.events import CLOSE_POLICY, CLOSE_SLOW_CONSUMER
from modelyard.core.events import LoadProgress
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import InferenceRequest, StreamChunk
from modelyard.plugins import auth as auth_plugin
from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore
from modelyard.testing import EchoBackend, LiveServer, run_live_server

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there world"}]}
TIMEOUT = 10.0  # a bound on each receive, never a wait for a timer


class ClosingBackend(EchoBackend):
    """Streams one token, then waits forever; records (thread-safely) when its stream closes."""

    name = "closing"
    closed = threading.Event()
    started = threading.Event()

    async def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        try:
            ClosingBackend.started.set()
            yield StreamChunk(text="first")
            await _forever()
            yield StreamChunk(text="never")
        finally:
            ClosingBackend.closed.set()


async def _forever() -> None:
    import asyncio

    await asyncio.Event().wait()


class _ClosingPlugin:
    @hookimpl
    def register_backends(self, register: Callable[[type[Any]], None]) -> None:
        register(ClosingBackend)


@dataclass
class Served:
    server: LiveServer
    service: InferenceService
    keys: dict[str, str]
    source: str

    def ws(self, path: str, key: str | None = None, **kwargs: Any) -> ClientConnection:
        url = self.server.url.replace("http://", "ws://") + path
        headers = {"Authorization": f"Bearer {key}"} if key else None
        return connect(url, additional_headers=headers, open_timeout=TIMEOUT, **kwargs)

    def post(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.post(self.server.url + path, headers=headers, timeout=TIMEOUT, **kwargs)


def _models(source: Path) -> list[dict[str, Any]]:
    # An empty folder: loading sizes the source's files, and "." would walk the repository.
    return [
        {"name": "m", "backend": "echo", "source": str(source), "task": "chat"},
        {"name": "other", "backend": "echo", "source": str(source), "task": "chat"},
        {"name": "slowchat", "backend": "closing", "source": str(source), "task": "chat"},
    ]


@contextlib.contextmanager
def _serve(host: PluginHost, settings: Settings, keys: dict[str, str]) -> Iterator[Served]:
    service = InferenceService(settings, host)
    app = create_app(settings, plugins=host, service=service)
    with run_live_server(app) as server:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "live server never became ready"
            time.sleep(0.01)
        yield Served(server, service, keys, settings.models[0].source)


@pytest.fixture
def host(plugin_host: PluginHost) -> Iterator[PluginHost]:
    plugin_host.register(_ClosingPlugin(), name="closing")
    plugin_host.register(auth_plugin, name="auth", source="modelyard")
    ClosingBackend.closed.clear()
    ClosingBackend.started.clear()
    try:
        yield plugin_host
    finally:
        plugin_host.unregister("closing")
        plugin_host.unregister("auth")


@pytest.fixture
def open_server(
    host: PluginHost, make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Served]:
    """Auth off (loopback): every client is the anonymous admin."""
    with _serve(host, make_settings(models=_models(tmp_path)), {}) as served:
        yield served


@pytest.fixture
def secured(
    host: PluginHost, make_settings: Callable[..., Settings], tmp_path: Path
) -> Iterator[Served]:
    database = str(tmp_path / "keys.sqlite3")
    settings = make_settings(models=_models(tmp_path), auth={
        "providers": [{"provider": "apikeys", "options": {"database": database}}],
        "audit_log": str(tmp_path / "audit.jsonl"),
    })
    store = KeyStore.open(ApiKeyOptions(database=database))
    keys = {
        "admin": store.create(name="admin", roles=["admin"]).key,
        "viewer-m": store.create(name="viewer-m", roles=["viewer"], models=["m"]).key,
    }
    with _serve(host, settings, keys) as served:
        yield served


def _recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(timeout=TIMEOUT))
    return message


def _until(ws: ClientConnection, done: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
    seen = []
    while True:
        event = _recv(ws)
        seen.append(event)
        if done(event):
            return seen


# -- /v1/events ---------------------------------------------------------------------------


def test_a_load_and_a_swap_arrive_in_order(open_server: Served) -> None:
    with open_server.ws("/v1/events?models=m") as ws:
        assert _recv(ws) == {"type": "subscribed", "kinds": None, "models": ["m"]}
        r = open_server.post(
            "/admin/models/m/versions", json={"version": "2", "source": open_server.source}
        )
        assert r.status_code == 202
        load = _until(ws, lambda e: e["kind"] == "version.state" and e["new"] == "ready")
        r = open_server.post("/admin/models/m/swap", json={"to": "2"})
        assert r.status_code == 200, r.text
        swap = _until(ws, lambda e: e["kind"] == "model.swap")
    events = load + swap
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert all(e["model"] == "m" for e in events)
    states = [(e["version"], e["old"], e["new"]) for e in events if e["kind"] == "version.state"]
    assert states == [
        ("2", None, "loading"), ("2", "loading", "ready"),
        ("2", "ready", "active"), ("1", "active", "deprecated"),
    ]
    progress = [e for e in load if e["kind"] == "load.progress"]
    # An added version is warmed up (its probe answered) before it is ready.
    assert [e["phase"] for e in progress] == ["resolving source", "loading", "health check",
                                              "warm-up", "ready"]
    percents = [e["percent"] for e in progress]
    assert percents == sorted(percents) and percents[-1] == 100.0
    assert load[0]["kind"] == "version.state" and load[0]["new"] == "loading"
    assert swap[-1]["from_version"] == "1" and swap[-1]["to_version"] == "2"


def test_a_subscriber_filters_by_kind_with_a_subscribe_message(open_server: Served) -> None:
    with open_server.ws("/v1/events") as ws:
        _recv(ws)
        ws.send(json.dumps({"type": "subscribe", "kinds": ["version.state"], "models": ["m"]}))
        assert _recv(ws)["kinds"] == ["version.state"]
        open_server.post(
            "/admin/models/m/versions", json={"version": "3", "source": open_server.source}
        )
        seen = _until(ws, lambda e: e.get("new") == "ready")
    assert {e["kind"] for e in seen} == {"version.state"}


def test_an_unknown_kind_is_an_error_message(open_server: Served) -> None:
    with open_server.ws("/v1/events") as ws:
        _recv(ws)
        ws.send(json.dumps({"type": "subscribe", "kinds": ["nope"]}))
        error = _recv(ws)
    assert error["type"] == "error" and error["error"]["code"] == 400
    assert "nope" in error["error"]["message"]


def test_an_unauthorised_client_is_refused(secured: Served) -> None:
    with pytest.raises(InvalidStatus) as refused:
        secured.ws("/v1/events", "my_not-a-key")
    assert refused.value.response.status_code == 403
    # Without a header, the first message must carry a valid token: else close 1008.
    with secured.ws("/v1/events") as ws:
        ws.send(json.dumps({"type": "subscribe", "token": "my_not-a-key"}))
        assert _recv(ws)["error"]["code"] == 401  # why, then the close
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_POLICY


def test_rbac_limits_events_to_the_principals_models(secured: Served) -> None:
    bus = secured.service.events
    with secured.ws("/v1/events", secured.keys["admin"]) as admin, secured.ws("/v1/events") as m:
        m.send(json.dumps({"type": "subscribe", "token": secured.keys["viewer-m"]}))
        _recv(admin), _recv(m)
        for model in ("other", "m"):
            bus.publish(LoadProgress(model=model, version="1", percent=1.0, phase="x"))
        assert [_recv(admin)["model"], _recv(admin)["model"]] == ["other", "m"]
        assert _recv(m)["model"] == "m"  # "other" is outside its scopes: never sent


def test_a_slow_consumer_is_dropped_without_stalling_others(open_server: Served) -> None:
    bus = open_server.service.events
    bus.buffer = 16
    # Incompressible (the server deflates messages): a few dozen fill a reader's buffers.
    big = base64.b64encode(os.urandom(192_000)).decode()
    wave, sent = 8, 0
    # A reader that stops reading: a small receive buffer (no autotuning) and one message.
    tight = socket.socket()
    tight.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tight.connect((open_server.server.host, open_server.server.port))
    with open_server.ws("/v1/events", max_queue=1, sock=tight) as slow, \
            open_server.ws("/v1/events") as fast:
        _recv(slow), _recv(fast)
        # Waves smaller than the buffer: the fast reader keeps up, the slow one (not
        # reading) backs up until its buffer overflows and the bus drops it.
        for _ in range(200):  # bounded: ~50 MB sent before giving up
            started = time.monotonic()
            for _ in range(wave):
                bus.publish(LoadProgress(model="m", version=str(sent), percent=0.0, phase=big))
                sent += 1
            assert time.monotonic() - started < 1.0  # publishing never waits for a reader
            got = [_recv(fast)["version"] for _ in range(wave)]
            assert got == [str(i) for i in range(sent - wave, sent)]
            if bus.subscribers == 1:
                break
        assert bus.subscribers == 1, "the slow consumer was never dropped"
        bus.publish(LoadProgress(model="m", version="after", percent=0.0, phase="x"))
        assert _recv(fast)["version"] == "after"  # the others go on
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                slow.recv(timeout=TIMEOUT)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_SLOW_CONSUMER


# -- /v1/chat/completions/ws -------------------------------------------------------------


def test_chat_streams_chunks_then_finish_and_usage(open_server: Served) -> None:
    with open_server.ws("/v1/chat/completions/ws") as ws:
        ws.send(json.dumps(CHAT))
        messages = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                messages.append(json.loads(ws.recv(timeout=TIMEOUT)))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    assert all(m["object"] == "chat.completion.chunk" for m in messages)
    text = "".join(m["choices"][0]["delta"].get("content", "") for m in messages)
    assert "hello there world" in text
    last = messages[-1]
    assert last["choices"][0]["finish_reason"] is not None
    assert last["usage"]["total_tokens"] == (
        last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )


def test_closing_the_socket_stops_the_generation_and_frees_its_slot(open_server: Served) -> None:
    with open_server.ws("/v1/chat/completions/ws") as ws:
        ws.send(json.dumps({**CHAT, "model": "slowchat"}))
        assert _recv(ws)["choices"][0]["delta"]["content"] == "first"
    assert ClosingBackend.closed.wait(TIMEOUT), "the backend's stream was never closed"
    version = open_server.service.registry.entry("slowchat").versions["1"]
    deadline = time.monotonic() + TIMEOUT
    while version.in_flight:  # bounded: the slot is released right after the stream closes
        assert time.monotonic() < deadline, "the request kept its slot"
        time.sleep(0.005)


def test_chat_errors_arrive_as_a_message_and_a_close_code(secured: Served) -> None:
    with secured.ws("/v1/chat/completions/ws", secured.keys["admin"]) as ws:
        ws.send(json.dumps({**CHAT, "model": "missing"}))
        error = _recv(ws)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=TIMEOUT)
    assert error["type"] == "error" and error["error"]["code"] == 404
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    with pytest.raises(InvalidStatus):  # a viewer may not infer
        secured.ws("/v1/chat/completions/ws", secured.keys["viewer-m"])


# -- modelyard models load --follow ------------------------------------------------------


def test_models_load_follow_prints_progress_from_the_events(open_server: Served) -> None:
    from click.testing import CliRunner

    from modelyard.cli import cli

    assert open_server.post("/v2/repository/models/m/unload").status_code == 200
    url = open_server.server.url
    result = CliRunner().invoke(cli, ["models", "load", "m", "--follow", "--url", url])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "m:1 loading"
    assert any("100.0% ready" in line for line in lines)
    assert lines[-2:] == ["m:1 active", "m: loaded"]
