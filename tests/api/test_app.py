"""The app as a whole: OpenAPI schema, lifespan, and plugins that failed to load."""

from __future__ import annotations

import time
from typing import Any

import pytest
from litestar.testing import TestClient

from modelyard.api.app import create_app, load_plugins
from modelyard.core.settings import decode_settings

ECHO = {"name": "echo", "backend": "echo", "source": ".", "task": "chat"}


async def test_openapi_schema_has_the_routes_and_security_schemes(start_api: Any) -> None:
    api = await start_api(ECHO)
    response = await api.client.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "modelyard"
    paths = schema["paths"]
    for path, method in [
        ("/v1/models", "get"), ("/v1/chat/completions", "post"), ("/v1/completions", "post"),
        ("/v1/embeddings", "post"), ("/v1/classify", "post"), ("/v1/plugins", "get"),
        ("/v2/health/ready", "get"), ("/v2/health/live", "get"),
        ("/v2/models/{name}/infer", "post"), ("/v2/models/{name}/versions/{version}/infer", "post"),
        ("/v2/repository/index", "post"), ("/v2/repository/models/{name}/load", "post"),
    ]:
        assert method in paths.get(path, {}), f"{method.upper()} {path} missing from the schema"
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiKey"]["type"] == "http" and schemes["apiKey"]["scheme"] == "bearer"
    assert schemes["jwt"]["bearerFormat"] == "JWT"
    # Declared per operation (health probes are public): tests/api/test_openapi.py.
    assert {"apiKey": []} in paths["/v1/models"]["get"]["security"]


def _wait_ready(client: TestClient[Any]) -> None:
    deadline = time.monotonic() + 10
    while client.get("/v2/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.005)


@pytest.mark.usefixtures("tiny_plugins")
def test_a_broken_plugin_is_listed_with_its_error_and_the_server_still_starts() -> None:
    settings = decode_settings({"models": [ECHO]}, env={})
    host = load_plugins(settings)  # real entry points, and the fakes the config names
    with TestClient(create_app(settings, plugins=host)) as client:
        _wait_ready(client)
        plugins = {p["name"]: p for p in client.get("/v1/plugins").json()["plugins"]}
        assert plugins["broken"]["status"] == "failed"
        assert "ImportError: tinybroken needs libfoo.so" in plugins["broken"]["error"]
        assert plugins["tiny"]["status"] == "loaded"
        assert plugins["tiny"]["backends"] == ["tiny"]
        assert plugins["tiny"]["version"] == "1.2.3"
        assert plugins["testing"]["status"] == "loaded"

        chat = client.post("/v1/chat/completions", json={
            "model": "echo", "messages": [{"role": "user", "content": "still serving"}],
        })
        assert chat.status_code == 200
        assert chat.json()["choices"][0]["message"]["content"] == "still serving"


def test_lifespan_loads_on_start_and_unloads_on_stop(plugin_host: Any) -> None:
    settings = decode_settings({"models": [ECHO]}, env={})
    app = create_app(settings, plugins=plugin_host)
    service = app.state["service"]
    with TestClient(app) as client:
        _wait_ready(client)
        assert service.registry.get("echo").serving
    assert service.draining
    assert service.registry.entry("echo").versions["1"].state.value == "unloaded"


def test_admin_models_describes_versions(plugin_host: Any) -> None:
    settings = decode_settings({"models": [ECHO]}, env={})
    with TestClient(create_app(settings, plugins=plugin_host)) as client:
        _wait_ready(client)
        body = client.get("/admin/models").json()
    assert body["ready"] is True
    [model] = body["models"]
    assert model["name"] == "echo" and model["active_version"] == "1"
    [version] = model["versions"]
    assert (version["state"], version["task"], version["backend"]) == ("active", "chat", "echo")
    assert version["parameters"] == {"fake": True}
