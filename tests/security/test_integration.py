"""Security wired into the real app: the route x role matrix, scopes, audit, limits, binds."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from click.testing import CliRunner
from litestar import Litestar
from litestar.routes import HTTPRoute

from modelyard.api import server as server_module
from modelyard.api.app import create_app
from modelyard.api.security import POLICIES, ROLE_PERMISSIONS, Permission, policy_for
from modelyard.cache import plugin as cache_plugin
from modelyard.cli import cli
from modelyard.core.audit import AuditLog
from modelyard.core.errors import ConfigError, RateLimitedError, ServiceUnavailableError
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, decode_settings
from modelyard.plugins import auth as auth_plugin
from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore
from modelyard.testing import run_live_server

ROOT = Path(__file__).resolve().parents[2]
JWT_SECRET = "j" * 32
#: The model every key may use, and one the scoped keys may not.
IN_SCOPE, OUT_OF_SCOPE = "echo", "doubler"
ROLES = ("admin", "operator", "user", "viewer")

MODELS = [
    {"name": "echo", "backend": "echo", "source": ".", "task": "chat"},
    {"name": "echo", "backend": "echo", "source": ".", "task": "chat", "version": "2"},
    {"name": "doubler", "backend": "echo", "source": ".", "task": "tensor"},
]


@dataclass
class Secured:
    client: httpx.AsyncClient
    app: Litestar
    service: InferenceService
    keys: dict[str, str]
    audit: AuditLog


def bearer(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.fixture
def auth_host(plugin_host: PluginHost) -> Iterator[PluginHost]:
    plugin_host.register(auth_plugin, name="auth", source="modelyard")
    plugin_host.register(cache_plugin, name="cache", source="modelyard")
    try:
        yield plugin_host
    finally:
        plugin_host.unregister("auth")
        plugin_host.unregister("cache")


def _auth_table(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "providers": [
            {"provider": "apikeys", "options": {"database": str(tmp_path / "keys.sqlite3")}},
            {"provider": "jwt", "options": {"algorithms": ["HS256"], "secret": JWT_SECRET,
                                            "issuer": "https://sso.test/",
                                            "audience": "modelyard"}},
        ],
        "audit_log": str(tmp_path / "audit.jsonl"),
        **extra,
    }


@pytest.fixture
async def secured(
    tmp_path: Path, auth_host: PluginHost, make_settings: Callable[..., Settings]
) -> AsyncIterator[Callable[..., Any]]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(**tables: Any) -> Secured:
            auth = _auth_table(tmp_path, **tables.pop("auth", {}))
            settings = make_settings(models=MODELS, auth=auth, **tables)
            service = InferenceService(settings, auth_host)
            app = create_app(settings, plugins=auth_host, service=service)
            await service.start()
            stack.push_async_callback(service.stop)
            await service.wait_until_loaded()
            store = KeyStore.open(ApiKeyOptions(database=str(tmp_path / "keys.sqlite3")))
            keys = {role: store.create(name=role, roles=[role]).key for role in ROLES}
            for role in ROLES:
                keys[f"scoped-{role}"] = store.create(
                    name=f"scoped-{role}", roles=[role], models=[IN_SCOPE]
                ).key
            client = httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=("10.9.8.7", 4000)),
                base_url="http://testserver",
            )
            await stack.enter_async_context(client)
            return Secured(client, app, service, keys, AuditLog(tmp_path / "audit.jsonl"))

        yield start


def _routes(app: Litestar) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves."""
    return sorted(
        (method, route.path_format)
        for route in app.routes if isinstance(route, HTTPRoute)
        for method in route.methods
    )


def _url(template: str, model: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: model if m[1] == "name" else "1", template)


async def _call(api: Secured, method: str, template: str, model: str, key: str | None) -> int:
    kwargs: dict[str, Any] = {"headers": bearer(key), "params": {"model": model}}
    if method in ("POST", "PUT", "PATCH"):
        kwargs["json"] = {"model": model}
    response = await api.client.request(method, _url(template, model), **kwargs)
    return response.status_code


async def test_every_route_has_a_policy_and_the_role_matrix_holds(secured: Any) -> None:
    api = await secured()
    routes = _routes(api.app)
    missing = [f"{m} {p}" for m, p in routes if policy_for(m, p) is None]
    assert not missing, f"routes without an access policy in api/security.py POLICIES: {missing}"
    # Read-only routes first, then the ones that change state (unload, swap, ...).
    routes.sort(key=lambda r: policy_for(*r).permission is Permission.OPERATE)  # type: ignore[union-attr]
    failures = []
    for method, template in routes:
        policy = policy_for(method, template)
        assert policy is not None
        anonymous = await _call(api, method, template, IN_SCOPE, None)
        if policy.permission is Permission.PUBLIC:
            if anonymous in (401, 403):
                failures.append(f"{method} {template}: public but {anonymous} without a key")
            continue
        if anonymous != 401:
            failures.append(f"{method} {template}: {anonymous} without a key, not 401")
        for role in ROLES:
            allowed = policy.permission in ROLE_PERMISSIONS[role]
            status = await _call(api, method, template, IN_SCOPE, api.keys[role])
            if allowed == (status == 403) or status == 401:
                failures.append(f"{method} {template}: {role} got {status}")
            if policy.model is not None:
                status = await _call(
                    api, method, template, OUT_OF_SCOPE, api.keys[f"scoped-{role}"]
                )
                if status != 403:
                    failures.append(
                        f"{method} {template}: scoped {role} on {OUT_OF_SCOPE} got {status}"
                    )
    assert not failures, "\n".join(failures)


async def test_models_outside_a_keys_scopes_are_invisible(secured: Any) -> None:
    api = await secured()
    scoped, full = bearer(api.keys["scoped-user"]), bearer(api.keys["user"])
    listed = (await api.client.get("/v1/models", headers=scoped)).json()["data"]
    assert [m["id"] for m in listed] == [IN_SCOPE]
    assert {m["id"] for m in (await api.client.get("/v1/models", headers=full)).json()["data"]} == {
        IN_SCOPE, OUT_OF_SCOPE}
    index = (await api.client.post("/v2/repository/index", headers=scoped)).json()
    assert {row["name"] for row in index} == {IN_SCOPE}
    admin_view = (
        await api.client.get("/admin/models", headers=bearer(api.keys["scoped-viewer"]))
    ).json()
    assert [m["name"] for m in admin_view["models"]] == [IN_SCOPE]
    hidden = await api.client.get(f"/v2/models/{OUT_OF_SCOPE}", headers=scoped)
    assert hidden.status_code == 403


async def test_inference_works_end_to_end_with_a_key_and_with_a_jwt(secured: Any) -> None:
    api = await secured()
    body = {"model": IN_SCOPE, "messages": [{"role": "user", "content": "hi"}]}
    answer = await api.client.post(
        "/v1/chat/completions", json=body, headers=bearer(api.keys["scoped-user"])
    )
    assert answer.status_code == 200, answer.text
    now = int(time.time())
    token = jwt.encode({"sub": "alice", "iss": "https://sso.test/", "aud": "modelyard",
                        "exp": now + 60, "roles": ["user"], "models": [IN_SCOPE]},
                       JWT_SECRET, algorithm="HS256")
    assert (
        await api.client.post("/v1/chat/completions", json=body, headers=bearer(token))
    ).status_code == 200
    other = await api.client.post("/v1/chat/completions", json={**body, "model": OUT_OF_SCOPE},
                                  headers=bearer(token))
    assert other.status_code == 403
    expired = jwt.encode({"sub": "alice", "iss": "https://sso.test/", "aud": "modelyard",
                          "exp": now - 3600, "roles": ["user"]}, JWT_SECRET, algorithm="HS256")
    refused = await api.client.get("/v1/models", headers=bearer(expired))
    assert (
        refused.status_code == 401
        and 'error="invalid_token"' in refused.headers["www-authenticate"]
    )
    assert "token expired" in refused.json()["detail"]


async def test_the_principals_tenant_keys_the_response_cache(secured: Any, tmp_path: Path) -> None:
    api = await secured(cache={"enabled": True, "directory": str(tmp_path / "cache")})
    store = KeyStore.open(ApiKeyOptions(database=str(tmp_path / "keys.sqlite3")))
    team_a, team_b = (store.create(name=t, roles=["user"], tenant=t).key for t in ("a", "b"))
    body = {"model": IN_SCOPE, "messages": [{"role": "user", "content": "same"}], "temperature": 0}

    async def ask(key: str) -> str:
        response = await api.client.post("/v1/chat/completions", json=body, headers=bearer(key))
        assert response.status_code == 200, response.text
        return str(response.headers["x-cache"])

    assert [await ask(team_a), await ask(team_a), await ask(team_b)] == ["MISS", "HIT", "MISS"]


async def test_every_admin_action_is_audited_with_its_outcome(secured: Any) -> None:
    api = await secured()
    admin = api.keys["admin"]
    key_id = "key:" + admin.split("_")[1]
    calls = [
        ("POST", "/admin/models/echo/canary", {"to": "2", "percent": 10}),
        ("DELETE", "/admin/models/echo/canary", None),
        ("POST", "/admin/models/echo/canary", {"to": "2", "percent": 10}),
        ("POST", "/admin/models/echo/canary/promote", None),
        ("POST", "/admin/models/echo/rollback", None),
        ("POST", "/admin/models/echo/swap", {"to": "2"}),
        ("POST", "/admin/models/echo/versions", {"version": "3", "source": "."}),
        ("DELETE", "/admin/models/echo/versions/9", None),
        ("POST", "/v2/repository/models/doubler/unload", None),
        ("POST", "/v2/repository/models/doubler/load", None),
        ("DELETE", "/admin/cache?model=echo", None),
    ]
    statuses = []
    for method, path, body in calls:
        response = await api.client.request(method, path, json=body, headers=bearer(admin))
        statuses.append(response.status_code)
    events = [e for e in api.audit.read() if e.action not in ("auth.failure", "access.denied")]
    assert [(f"{e.target}", e.status) for e in events] == [
        (f"{m} {p.split('?')[0]}", s) for (m, p, _), s in zip(calls, statuses, strict=True)
    ]
    assert {e.action for e in events} == {
        "canary.start", "canary.stop", "canary.promote", "model.rollback", "model.swap",
        "version.add", "version.unload", "model.unload", "model.load", "cache.purge"}
    assert all(e.principal == key_id and e.client == "10.9.8.7" for e in events)
    assert [e.result for e in events if e.action == "version.unload"] == ["failed"]  # 404
    audited = {(e.action) for e in events}
    served = {f"{m} {p}" for m, p in _routes(api.app)}
    actions = {p.action for k, p in POLICIES.items() if p.action and k in served}
    assert actions <= audited, f"admin actions never exercised here: {actions - audited}"
    text = api.audit.path.read_text()  # type: ignore[union-attr]
    assert admin not in text and admin.split("_", 2)[2] not in text


async def test_rate_limits_are_429_not_503(secured: Any) -> None:
    api = await secured(auth={"rate_limits": {"user": {"rate": 0.001, "burst": 1}}})
    user = bearer(api.keys["user"])
    first = await api.client.get("/v1/models", headers=user)
    assert first.status_code == 200 and first.headers["ratelimit-policy"] == '"user";q=1;w=1000'
    second = await api.client.get("/v1/models", headers=user)
    assert second.status_code == 429 and int(second.headers["retry-after"]) == 1000
    assert second.json()["type"].endswith(RateLimitedError.type_slug)
    assert RateLimitedError.type_slug != ServiceUnavailableError.type_slug


async def test_request_limits_are_422(secured: Any) -> None:
    api = await secured(limits={"models": {"echo": {"max_tokens": 8, "max_input_chars": 10}}})
    user = bearer(api.keys["user"])

    def chat(content: str, **extra: Any) -> dict[str, Any]:
        return {"model": "echo", "messages": [{"role": "user", "content": content}], **extra}

    assert (
        await api.client.post("/v1/chat/completions", json=chat("hi", max_tokens=8), headers=user)
    ).status_code == 200
    too_many = await api.client.post(
        "/v1/chat/completions", json=chat("hi", max_tokens=9), headers=user
    )
    assert too_many.status_code == 422 and "max_tokens 9" in too_many.json()["detail"]
    too_long = await api.client.post("/v1/chat/completions", json=chat("x" * 11), headers=user)
    assert too_long.status_code == 422
    v2 = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["x" * 11]}]}
    assert (
        await api.client.post("/v2/models/echo/infer", json=v2, headers=user)
    ).status_code == 422


def test_auth_off_refuses_non_loopback_unless_forced(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        create_app(make_settings(server={"host": "0.0.0.0"}), plugins=plugin_host)
    create_app(make_settings(server={"host": "127.0.0.1"}), plugins=plugin_host)
    create_app(
        make_settings(
            server={"host": "0.0.0.0"}, auth={"allow_unauthenticated_non_loopback": True}
        ),
        plugins=plugin_host,
    )
    config = tmp_path / "c.toml"
    config.write_text((ROOT / "examples" / "echo.toml").read_text())
    result = CliRunner().invoke(cli, ["serve", "-c", str(config), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "without authentication" in result.output


def test_an_unknown_provider_is_a_config_error(
    plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(auth={"providers": [{"provider": "ldap"}]})
    with pytest.raises(
        ConfigError, match=r"\$\.auth\.providers\[0\]\.provider: unknown auth provider"
    ):
        create_app(settings, plugins=plugin_host)


def test_the_keys_cli_reads_the_config_and_audits(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    db, audit = tmp_path / "k.sqlite3", tmp_path / "audit.jsonl"
    config.write_text(f'[auth]\naudit_log = "{audit}"\n[[auth.providers]]\nprovider = "apikeys"\n'
                      f'options = {{ database = "{db}" }}\n')
    created = CliRunner().invoke(cli, ["keys", "-c", str(config), "create", "--name", "ci",
                                       "--role", "operator"])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip()
    assert KeyStore.open(ApiKeyOptions(database=str(db))).verify(key).roles == ("operator",)
    (event,) = AuditLog(audit).read()
    assert event.action == "key.create" and event.target == "key:" + key.split("_")[1]
    assert key not in audit.read_text() and key.encode() not in db.read_bytes()


# -- body limits against a real uvicorn server ---------------------------------------------


@pytest.fixture
def live_small_body(
    plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> Iterator[Any]:
    settings = make_settings(models=MODELS[:1], server={"max_body_bytes": 2048},
                             limits={"body_timeout_s": 0.5})
    with run_live_server(create_app(settings, plugins=plugin_host)) as server:
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        yield server


def _raw(server: Any, head: str, body_parts: list[bytes]) -> bytes:
    """Send a request by hand (a lying Content-Length, chunks) and read what comes back."""
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        for part in body_parts:
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server already answered and closed: that is the point
        chunks = []
        with contextlib.suppress(ConnectionResetError):
            while data := sock.recv(65536):
                chunks.append(data)
        return b"".join(chunks)


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def test_a_large_content_length_is_413_before_the_body_is_sent(live_small_body: Any) -> None:
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000\r\n\r\n")
    started = time.monotonic()
    raw = _raw(live_small_body, head, [])  # not one byte of the 100 MB is sent
    assert _status(raw) == 413, raw[:200]
    assert time.monotonic() - started < 5
    assert b"exceeds the server's limit" in raw


def test_a_chunked_body_over_the_limit_is_413_while_streaming(live_small_body: Any) -> None:
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"400\r\n" + b"x" * 0x400 + b"\r\n"
    raw = _raw(live_small_body, head, [chunk] * 3 + [b"0\r\n\r\n"])
    assert _status(raw) == 413, raw[:200]


def test_a_stalled_body_is_408(live_small_body: Any) -> None:
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 100\r\n\r\n")
    raw = _raw(live_small_body, head, [b'{"model": "echo"'])  # then nothing
    assert _status(raw) == 408, raw[:200]


def test_without_a_key_a_large_upload_is_refused_unread(
    auth_host: PluginHost, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    settings = make_settings(models=MODELS[:1], auth=_auth_table(tmp_path))
    with run_live_server(create_app(settings, plugins=auth_host)) as server:
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000000\r\n\r\n"
        )
        raw = _raw(server, head, [])
    assert _status(raw) == 401
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["status"] == 401


def test_serve_passes_the_connection_limits_to_uvicorn(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(limits={"keep_alive_timeout_s": 7, "max_header_bytes": 8192,
                                     "max_connections": 64, "http_parser": "h11"})
    service = InferenceService(settings, plugin_host)
    seen: list[Any] = []
    monkeypatch.setattr(server_module.DrainingServer, "run", lambda self: seen.append(self.config))
    server_module.serve(create_app(settings, plugins=plugin_host, service=service), service,
                        settings.server)
    (config,) = seen
    assert (config.http, config.timeout_keep_alive, config.h11_max_incomplete_event_size,
            config.limit_concurrency) == ("h11", 7, 8192, 64)
    default = make_settings()
    assert default.limits.http_parser == "httptools"  # speed by default; h11 to bound headers


def test_the_documented_config_is_valid(auth_host: PluginHost, tmp_path: Path) -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    settings = decode_settings(example, env={})
    assert [p.provider for p in settings.auth.providers] == ["apikeys", "jwt"]
    assert settings.limits.for_model("chat-small").max_tokens == 512
    assert set(settings.auth.rate_limits) == {"user", "viewer", "anonymous"}


async def test_auth_failures_and_rate_limiting_show_in_metrics(secured: Any) -> None:
    api = await secured(auth={"rate_limits": {"user": {"rate": 0.001, "burst": 1}}})
    assert (await api.client.get("/v1/models")).status_code == 401
    assert (await api.client.get("/v1/models", headers=bearer("my_bogus_key"))).status_code == 401
    user = bearer(api.keys["user"])
    assert (await api.client.get("/v1/models", headers=user)).status_code == 200
    assert (await api.client.get("/v1/models", headers=user)).status_code == 429
    text = (await api.client.get("/metrics", headers=bearer(api.keys["admin"]))).text
    assert 'modelyard_auth_failures_total{reason="missing"} 1.0' in text
    assert 'modelyard_auth_failures_total{reason="invalid"} 1.0' in text
    assert 'modelyard_rate_limited_requests_total{model=""} 1.0' in text
