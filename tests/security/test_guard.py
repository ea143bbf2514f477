"""The guard on a small app: 401/403/429, WWW-Authenticate, RateLimit fields, audit, bind rule."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar, Request, get, post

from modelyard.api.exchange import Exchange
from modelyard.api.problems import exception_handlers
from modelyard.api.security import (
    POLICIES,
    Permission,
    Security,
    assert_checked,
    is_loopback,
    model_allowed,
    policy_for,
    principal_of,
)
from modelyard.core.audit import AuditLog
from modelyard.core.auth import Principal
from modelyard.core.auth_settings import AuthSettings
from modelyard.core.errors import ConfigError
from modelyard.core.metrics import Metrics
from modelyard.core.ratelimit import RateLimiter
from modelyard.core.telemetry import Telemetry
from modelyard.plugins.apikeys import ApiKeyProvider

Clocks = Any  # tests/security/conftest.py: ``.monotonic`` and ``.wall`` fake clocks


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@get("/v2/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@get("/v1/models")
async def models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    principal = principal_of(request)
    assert principal is not None and request.user is principal
    assert request.state.principal is principal
    return {"principal": principal.id, "tenant": principal.tenant}


@post("/v1/chat/completions", status_code=200)
async def chat(data: dict[str, Any]) -> dict[str, Any]:
    return {"model": data["model"]}


@post("/admin/models/{name:str}/swap", status_code=200)
async def swap(name: str) -> dict[str, str]:
    return {"swapped": name}


@get("/unlisted")
async def unlisted() -> None:
    return None


Make = Callable[..., Any]


@pytest.fixture
async def make(tmp_path: Path, clocks: Clocks) -> AsyncIterator[Make]:
    clients: list[httpx.AsyncClient] = []

    def build(providers: list[Any], **auth: Any) -> tuple[httpx.AsyncClient, Security]:
        settings = msgspec.convert(auth, AuthSettings)
        security = Security(
            settings, providers, limiter=RateLimiter(clock=clocks.monotonic),
            audit=AuditLog(tmp_path / "audit.jsonl", clock=clocks.wall),
        )
        app = Litestar(
            [live, models, chat, swap, unlisted], before_request=security.before_request,
            exception_handlers=exception_handlers,
        )
        app.asgi_handler = Exchange(
            app.asgi_handler, Telemetry(metrics=Metrics(process=False)),
            response_hooks=[security.on_response_start],
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, client=("10.0.0.7", 5000)),
            base_url="http://testserver",
        )
        clients.append(client)
        return client, security

    yield build
    for client in clients:
        await client.aclose()


async def test_health_is_open_and_unlisted_routes_are_refused(
    make: Make, key_provider: ApiKeyProvider, keys: dict[str, str]
) -> None:
    client, _ = make([key_provider])
    assert (await client.get("/v2/health/live")).status_code == 200
    refused = await client.get("/unlisted", headers=bearer(keys["admin"]))
    assert refused.status_code == 403 and "no access policy" in refused.json()["detail"]


async def test_missing_invalid_expired_and_revoked_credentials_are_401(
    make: Make, key_provider: ApiKeyProvider, keys: dict[str, str], clocks: Clocks
) -> None:
    client, security = make([key_provider])
    missing = await client.get("/v1/models")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="modelyard"'
    store = key_provider.store
    expiring = store.create(name="short", roles=["user"], expires_at=clocks.wall() + 60)
    revoked = store.create(name="gone", roles=["user"])
    store.revoke(revoked.record.id)
    clocks.wall.advance(60)
    for header, reason in [
        (bearer(keys["user"][:-2] + "xx"), "is not valid"),
        (bearer(expiring.key), "is expired"),
        (bearer(revoked.key), "is revoked"),
        (bearer("opaque-token"), "not recognised"),
        ({"Authorization": "Bearer"}, "malformed"),
    ]:
        response = await client.get("/v1/models", headers=header)
        assert response.status_code == 401, header
        assert reason in response.json()["detail"]
        challenge = response.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="modelyard", error="invalid_token"')
    failures = [e for e in security.audit.read() if e.action == "auth.failure"]
    assert len(failures) == 6 and {e.client for e in failures} == {"10.0.0.7"}
    text = security.audit.path.read_text()  # type: ignore[union-attr]
    for key in (keys["user"], expiring.key, revoked.key):
        assert key not in text and key.split("_", 2)[2] not in text


async def test_roles_decide_and_a_missing_role_is_403(
    make: Make, key_provider: ApiKeyProvider, keys: dict[str, str]
) -> None:
    client, security = make([key_provider])
    body = {"model": "echo"}
    expected = {"admin": (200, 200, 200), "operator": (200, 403, 200),
                "user": (200, 200, 403), "viewer": (200, 403, 403)}
    for role, statuses in expected.items():
        got = (
            (await client.get("/v1/models", headers=bearer(keys[role]))).status_code,
            (
                await client.post("/v1/chat/completions", json=body, headers=bearer(keys[role]))
            ).status_code,
            (await client.post("/admin/models/echo/swap", headers=bearer(keys[role]))).status_code,
        )
        assert got == statuses, role
    denied = [e for e in security.audit.read() if e.action == "access.denied"]
    assert {e.principal.split(":")[0] for e in denied} == {"key"}
    swaps = [e for e in security.audit.read() if e.action == "model.swap"]
    assert [(e.result, e.status) for e in swaps] == [("ok", 200), ("ok", 200)]
    assert swaps[0].target == "POST /admin/models/echo/swap" and swaps[0].client == "10.0.0.7"


async def test_model_scopes_apply_to_bodies_and_paths(
    make: Make, key_provider: ApiKeyProvider, keys: dict[str, str]
) -> None:
    client, _ = make([key_provider])
    scoped = bearer(keys["scoped"])
    ok = await client.post("/v1/chat/completions", json={"model": "echo", "x": [1]}, headers=scoped)
    assert ok.status_code == 200 and ok.json() == {"model": "echo"}  # the body is still readable
    other = await client.post("/v1/chat/completions", json={"model": "other"}, headers=scoped)
    assert other.status_code == 403 and "'other'" in other.json()["detail"]
    bad = await client.post("/v1/chat/completions", content=b"{", headers=scoped)
    assert bad.status_code == 400


async def test_rate_limits_per_role_with_ietf_fields_and_exact_refill(
    make: Make, key_provider: ApiKeyProvider, keys: dict[str, str], clocks: Clocks
) -> None:
    client, _ = make([key_provider], rate_limits={"user": {"rate": 0.5, "burst": 2}})
    user = bearer(keys["user"])
    first = await client.get("/v1/models", headers=user)
    assert first.headers["ratelimit-policy"] == '"user";q=2;w=4'
    assert first.headers["ratelimit"] == '"user";r=1;t=2'
    assert (await client.get("/v1/models", headers=user)).headers["ratelimit"] == '"user";r=0;t=4'
    refused = await client.get("/v1/models", headers=user)
    assert refused.status_code == 429
    assert refused.json()["type"].endswith("/rate-limited")
    assert refused.headers["retry-after"] == "2"
    assert refused.headers["ratelimit"] == '"user";r=0;t=4'
    clocks.monotonic.advance(1.999)
    assert (await client.get("/v1/models", headers=user)).status_code == 429
    clocks.monotonic.advance(0.001)
    assert (await client.get("/v1/models", headers=user)).status_code == 200
    # admin has no entry: not limited; another key has its own bucket
    assert (
        "ratelimit" not in (await client.get("/v1/models", headers=bearer(keys["admin"]))).headers
    )
    assert (await client.get("/v1/models", headers=bearer(keys["scoped"]))).status_code == 200


async def test_a_keys_own_limit_beats_its_roles(
    make: Make, key_provider: ApiKeyProvider, clocks: Clocks
) -> None:
    from modelyard.core.ratelimit import RateLimit

    own = key_provider.store.create(
        name="batch", roles=["user"], rate_limit=RateLimit(rate=1, burst=1)
    )
    client, _ = make([key_provider], rate_limits={"user": {"rate": 100, "burst": 100}})
    first = await client.get("/v1/models", headers=bearer(own.key))
    assert first.headers["ratelimit-policy"] == '"key";q=1;w=1'
    assert (await client.get("/v1/models", headers=bearer(own.key))).status_code == 429


async def test_repeated_auth_failures_from_one_address_turn_into_429(
    make: Make, key_provider: ApiKeyProvider
) -> None:
    client, _ = make([key_provider], rate_limits={"anonymous": {"rate": 1, "burst": 2}})
    statuses = [(await client.get("/v1/models")).status_code for _ in range(3)]
    assert statuses == [401, 401, 429]


async def test_auth_off_serves_everyone_as_anonymous_limited_per_address(
    make: Make, clocks: Clocks
) -> None:
    client, _ = make([], rate_limits={"anonymous": {"rate": 1, "burst": 1}})
    first = await client.get("/v1/models")
    assert first.json() == {"principal": "anonymous", "tenant": ""}
    assert first.headers["ratelimit-policy"] == '"anonymous";q=1;w=1'
    assert (await client.get("/v1/models")).status_code == 429
    clocks.monotonic.advance(1)
    assert (await client.post("/admin/models/echo/swap")).status_code == 200


async def test_anonymous_roles_narrow_what_auth_off_allows(make: Make) -> None:
    client, _ = make([], anonymous_roles=["viewer"])
    assert (await client.get("/v1/models")).status_code == 200
    assert (await client.post("/admin/models/echo/swap")).status_code == 403


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.0.0.1", False),
    ("example.com", False),
])
def test_loopback_detection(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_auth_off_refuses_a_non_loopback_bind_unless_forced(key_provider: ApiKeyProvider) -> None:
    Security(AuthSettings()).check_bind("127.0.0.1")
    with pytest.raises(ConfigError, match="refusing to serve '0.0.0.0' without authentication"):
        Security(AuthSettings()).check_bind("0.0.0.0")
    Security(AuthSettings(allow_unauthenticated_non_loopback=True)).check_bind("0.0.0.0")
    Security(AuthSettings(), [key_provider]).check_bind("0.0.0.0")


def test_policy_lookup() -> None:
    assert policy_for("GET", "/v2/health/ready").permission is Permission.PUBLIC
    assert policy_for("OPTIONS", "/admin/models").permission is Permission.PUBLIC
    assert policy_for("GET", "/schema/openapi.json").permission is Permission.PUBLIC
    assert policy_for("GET", "/schemas") is None
    assert policy_for("DELETE", "/v1/models") is None
    assert policy_for("GET", "/metrics").permission is Permission.INSPECT
    operate = [k for k, p in POLICIES.items() if p.permission is Permission.OPERATE]
    assert all(POLICIES[k].action for k in operate), "every admin action is audited"


def test_model_scopes_take_patterns() -> None:
    scoped = Principal(id="p", model_scopes=frozenset({"chat-*", "echo"}))
    assert model_allowed(scoped, "chat-small") and model_allowed(scoped, "echo")
    assert not model_allowed(scoped, "echo2") and not model_allowed(scoped, "CHAT-x")
    assert model_allowed(Principal(id="all"), "anything")


async def test_a_route_with_its_own_before_request_hook_is_refused_at_startup() -> None:
    """Litestar runs only the closest layer's hook: one of a route's own would skip the check."""
    security = Security(AuthSettings())

    async def own_hook(request: Request[Any, Any, Any]) -> None:
        return None

    @get("/v1/plugins", before_request=own_hook)
    async def plugins() -> None:
        return None

    shadowed = Litestar([live, plugins], before_request=security.before_request)
    with pytest.raises(ConfigError, match=r"/v1/plugins \(plugins\) sets its own before_request"):
        assert_checked(shadowed)
    with pytest.raises(ConfigError, match="no before_request hook"):
        assert_checked(Litestar([live]))
    assert_checked(Litestar([live, models], before_request=security.before_request))
