"""A plugin's own routes under /ext/{name}: mounted, listed, and behind our auth and RBAC."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from litestar import get, post

from modelyard import ApiExtension, PluginHost, create_app, hookimpl
from modelyard.core.settings import decode_settings
from modelyard.plugins import auth as auth_plugin
from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore


@get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


@get("/models/{name:str}/card")
async def card(name: str) -> dict[str, str]:
    return {"card": name}


@post("/reset", status_code=200)
async def reset() -> dict[str, bool]:
    return {"reset": True}


def _plugin() -> Any:
    @hookimpl
    def register_api_routes(register: Any) -> None:
        register(ApiExtension(
            name="notes", handlers=[hello, card, reset],
            permissions={"GET /hello": "read", "GET /models/{name}/card": "read"},
            model_scoped=True,
        ))

    return SimpleNamespace(register_api_routes=register_api_routes)


@pytest.fixture
def host(plugin_host: PluginHost) -> Iterator[PluginHost]:
    assert plugin_host.register(_plugin(), name="notes")
    assert plugin_host.register(auth_plugin, name="auth")
    try:
        yield plugin_host
    finally:
        plugin_host.unregister("notes")
        plugin_host.unregister("auth")


def _keys(db: Path) -> dict[str, str]:
    store = KeyStore.open(ApiKeyOptions(database=str(db)))
    return {
        "admin": store.create(name="a", roles=["admin"]).key,
        "user": store.create(name="u", roles=["user"]).key,
        "scoped": store.create(name="s", roles=["user"], models=["echo"]).key,
    }


async def test_extension_routes_are_mounted_and_guarded(host: PluginHost, tmp_path: Path) -> None:
    db = tmp_path / "keys.sqlite3"
    keys = _keys(db)
    settings = decode_settings({
        "models": [{"name": "echo", "backend": "echo", "source": ".", "task": "chat"}],
        "auth": {"providers": [{"provider": "apikeys", "options": {"database": str(db)}}]},
    }, env={})
    app = create_app(settings, plugins=host)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

        async def call(method: str, path: str, key: str | None) -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            return await client.request(method, path, headers=headers)

        assert (await call("GET", "/ext/notes/hello", None)).status_code == 401
        ok = await call("GET", "/ext/notes/hello", keys["user"])
        assert ok.status_code == 200 and ok.json() == {"hello": "world"}
        # No permission named: admin only.
        assert (await call("POST", "/ext/notes/reset", keys["user"])).status_code == 403
        assert (await call("POST", "/ext/notes/reset", keys["admin"])).status_code == 200
        # The model in the path is checked against the caller's model scopes.
        assert (await call("GET", "/ext/notes/models/echo/card", keys["scoped"])).status_code == 200
        refused = await call("GET", "/ext/notes/models/other/card", keys["scoped"])
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("application/problem+json")
        plugins = (await call("GET", "/v1/plugins", keys["admin"])).json()["plugins"]
        assert {p["name"]: p for p in plugins}["notes"]["api_extensions"] == ["notes"]


def test_an_extension_must_name_valid_permissions() -> None:
    with pytest.raises(ValueError, match="permission 'public'"):
        ApiExtension(name="x", handlers=[hello], permissions={"GET /hello": "public"})
    with pytest.raises(ValueError, match="lowercase"):
        ApiExtension(name="Bad Name", handlers=[hello])


def test_two_plugins_cannot_take_the_same_prefix(plugin_host: PluginHost) -> None:
    assert plugin_host.register(_plugin(), name="notes")
    try:
        assert not plugin_host.register(_plugin(), name="notes-again")
        failed = {r.name: r for r in plugin_host.records}["notes-again"]
        assert failed.status == "failed" and "/ext/notes registered twice" in failed.error
    finally:
        plugin_host.unregister("notes")
        plugin_host.unregister("notes-again")
