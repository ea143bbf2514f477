"""API fixtures: the app served in the test's own event loop, and a problem+json check."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, load_settings
from modelyard.testing import LiveServer, run_live_server
from modelyard.testing import plugin as fake_plugin

EXAMPLE = Path(__file__).parents[2] / "examples" / "echo.toml"

#: Markers of leaked internals that must never reach a client.
LEAKS = ("Traceback", 'File "', "site-packages", ".py\", line")


@dataclass
class Api:
    client: httpx.AsyncClient
    service: InferenceService
    app: Litestar


StartApi = Callable[..., Any]


@pytest.fixture
async def start_api(
    plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> AsyncIterator[StartApi]:
    """``await start_api({model table}, ..., server={...})``: the app over ASGI, models loaded.

    The service runs in the test's loop (no portal thread), so concurrent requests really
    overlap and ``wait_until_loaded`` replaces polling.
    """
    async with contextlib.AsyncExitStack() as stack:

        async def start(*models: dict[str, Any], wait: bool = True, **tables: Any) -> Api:
            settings = make_settings(models=list(models), **tables)
            service = InferenceService(settings, plugin_host)
            app = create_app(settings, plugins=plugin_host, service=service)
            await service.start()
            stack.push_async_callback(service.stop)
            if wait:
                await service.wait_until_loaded()
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://testserver"
            )
            await stack.enter_async_context(client)
            return Api(client, service, app)

        yield start


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """An RFC 9457 problem+json body with the right status and no leaked internals."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    for key in ("type", "title", "status", "detail", "instance"):
        assert key in body, f"problem body lacks {key!r}: {body}"
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["instance"] == response.request.url.path
    assert isinstance(body["detail"], str) and body["detail"]
    for leak in LEAKS:
        assert leak not in response.text, f"{leak!r} leaked into {response.text}"
    if body["instance"].startswith("/v2"):
        assert body["error"] == body["detail"]  # tritonclient reads a string
    else:
        assert body["error"]["message"] == body["detail"]  # the openai SDK reads an object
        assert body["error"]["code"] == status
    return body


@pytest.fixture
def problem() -> Callable[[httpx.Response, int], dict[str, Any]]:
    return assert_problem


@pytest.fixture(scope="module")
def live_echo() -> Iterator[LiveServer]:
    """examples/echo.toml (echo: chat, echo-embed: embeddings dim 16, doubler: tensor) served
    by a real uvicorn on 127.0.0.1, ready before the first test."""
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing", source="modelyard.testing")
    app = create_app(load_settings(EXAMPLE, env={}), plugins=host)
    with run_live_server(app) as server:
        deadline = time.monotonic() + 30
        # Bounded poll of the public readiness probe: loading happens in the server's loop.
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "live server never became ready"
            time.sleep(0.01)
        yield server
