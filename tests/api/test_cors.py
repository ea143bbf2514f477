"""CORS for browser clients: off by default; preflights answered without credentials; the
CORS fields only ever for an allowed origin."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings
from modelyard.plugins import auth as auth_plugin

APP = "https://app.example.com"
EVIL = "https://evil.example.net"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
ECHO = {"name": "echo", "backend": "echo", "source": ".", "task": "chat"}
JWT_SECRET = "c" * 32
JWT_AUTH = {"providers": [{"provider": "jwt", "options": {"algorithms": ["HS256"],
                                                          "secret": JWT_SECRET}}]}


def _preflight(origin: str, method: str = "POST", headers: str = "content-type") -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


def _cors_fields(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower().startswith("access-control-")}


@pytest.fixture
async def api(start_api: Any) -> Any:
    return await start_api(ECHO, cors={"allow_origins": [APP], "max_age_s": 120})


async def test_cors_is_off_by_default(start_api: Any) -> None:
    api = await start_api(ECHO)
    response = await api.client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert response.status_code == 200
    assert _cors_fields(response.headers) == {}
    preflight = await api.client.options("/v1/chat/completions", headers=_preflight(APP))
    assert _cors_fields(preflight.headers) == {}


async def test_a_preflight_from_an_allowed_origin_is_answered(api: Any) -> None:
    response = await api.client.options(
        "/v1/chat/completions", headers=_preflight(APP, headers="Authorization, Content-Type")
    )
    assert response.status_code == 204
    fields = _cors_fields(response.headers)
    assert fields["access-control-allow-origin"] == APP
    assert set(fields["access-control-allow-methods"].split(", ")) == {"GET", "POST"}
    assert "Authorization" in fields["access-control-allow-headers"]
    assert fields["access-control-max-age"] == "120"
    assert "access-control-allow-credentials" not in fields  # off by default
    assert "Origin" in response.headers["vary"]
    assert response.headers["x-request-id"]  # the exchange layer answered it


async def test_actual_responses_carry_the_origin_only_when_it_is_allowed(api: Any) -> None:
    allowed = await api.client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == APP
    exposed = allowed.headers["access-control-expose-headers"]
    assert "X-Request-Id" in exposed and "X-Model-Version" in exposed
    assert "Origin" in allowed.headers["vary"]

    other = await api.client.post("/v1/chat/completions", json=CHAT, headers={"Origin": EVIL})
    assert other.status_code == 200  # CORS is the browser's check; the server just won't vouch
    assert _cors_fields(other.headers) == {}

    # Errors are readable by an allowed page too (a 404 here).
    missing = await api.client.get("/v1/nope", headers={"Origin": APP})
    assert missing.status_code == 404
    assert missing.headers["access-control-allow-origin"] == APP


@pytest.mark.parametrize(
    ("origin", "method", "headers", "why"),
    [
        (EVIL, "POST", "content-type", "origin"),
        ("null", "POST", "content-type", "origin"),
        (APP, "PUT", "content-type", "method"),
        (APP, "POST", "x-secret-header", "header"),
    ],
)
async def test_a_refused_preflight_is_403_without_cors_fields(
    api: Any, problem: Any, origin: str, method: str, headers: str, why: str
) -> None:
    response = await api.client.options(
        "/v1/chat/completions", headers=_preflight(origin, method, headers)
    )
    body = problem(response, 403)
    assert why in body["detail"]
    assert _cors_fields(response.headers) == {}


async def test_a_preflight_needs_no_credentials_but_the_request_does(
    start_api: Any, plugin_host: PluginHost
) -> None:
    plugin_host.register(auth_plugin, name="auth", source="modelyard")
    try:
        api = await start_api(ECHO, auth=JWT_AUTH, cors={"allow_origins": [APP]})
        preflight = await api.client.options(
            "/v1/chat/completions", headers=_preflight(APP, headers="authorization, content-type")
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == APP
        unauthenticated = await api.client.post(
            "/v1/chat/completions", json=CHAT, headers={"Origin": APP}
        )
        assert unauthenticated.status_code == 401
        # The page can read why (the 401 names the origin), not only see a CORS failure.
        assert unauthenticated.headers["access-control-allow-origin"] == APP
        token = jwt.encode({"sub": "browser", "roles": ["user"], "exp": time.time() + 60},
                           JWT_SECRET, algorithm="HS256")
        allowed = await api.client.post(
            "/v1/chat/completions", json=CHAT,
            headers={"Origin": APP, "Authorization": f"Bearer {token}"},
        )
        assert allowed.status_code == 200, allowed.text
        assert allowed.headers["access-control-allow-origin"] == APP
    finally:
        plugin_host.unregister("auth")


async def test_any_origin_without_credentials_is_a_wildcard(start_api: Any) -> None:
    api = await start_api(ECHO, cors={"allow_origins": ["*"]})
    response = await api.client.post("/v1/chat/completions", json=CHAT, headers={"Origin": EVIL})
    assert response.headers["access-control-allow-origin"] == "*"
    preflight = await api.client.options("/v1/embeddings", headers=_preflight(EVIL))
    assert preflight.headers["access-control-allow-origin"] == "*"


async def test_credentials_are_sent_only_to_an_explicit_origin(start_api: Any) -> None:
    api = await start_api(ECHO, cors={"allow_origins": [APP], "allow_credentials": True})
    response = await api.client.post("/v1/chat/completions", json=CHAT, headers={"Origin": APP})
    assert response.headers["access-control-allow-origin"] == APP
    assert response.headers["access-control-allow-credentials"] == "true"


@pytest.mark.parametrize(
    ("cors", "path"),
    [
        ({"allow_origins": ["*"], "allow_credentials": True}, "$.cors"),
        ({"allow_origins": ["https://app.example.com/"]}, "$.cors.allow_origins[0]"),
        ({"allow_origins": ["app.example.com"]}, "$.cors.allow_origins[0]"),
        ({"allow_origins": [APP], "allow_methods": ["TRACE"]}, "$.cors.allow_methods[0]"),
        ({"allow_origins": [APP], "allow_origin": [APP]}, "allow_origin"),
    ],
)
def test_a_cors_config_mistake_names_its_path(cors: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace("$", r"\$").replace("[", r"\[")):
        decode_settings({"cors": cors}, env={})
