"""JWT keys from an OIDC issuer or a JWKS URL, served by a local HTTP server the test starts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from modelyard.api.app import create_app
from modelyard.core.auth import Credentials, Principal
from modelyard.core.errors import UnauthorizedError
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.plugins import auth as auth_plugin
from modelyard.plugins._jwks import MAX_JWKS_BYTES, MAX_JWKS_KEYS
from modelyard.plugins.jwt import JwtOptions, JwtProvider
from modelyard.testing import FakeClock

AUD = "modelyard"
DISCOVERY, JWKS = "/.well-known/openid-configuration", "/jwks"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class Issuer:
    """What the local server answers; ``hits`` counts requests per path."""

    url: str = ""
    routes: dict[str, tuple[int, bytes, dict[str, str]]] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    down: bool = False
    #: Send no Content-Length (the body ends when the connection closes).
    omit_length: bool = False
    #: Set: requests wait for it before answering (a hung issuer).
    hang: threading.Event | None = None

    def publish(self, keys: dict[str, PrivateKey], *, cache_control: str | None = None,
                issuer: str | None = None, jwks_uri: str | None = None) -> None:
        document = {"issuer": issuer or self.url, "jwks_uri": jwks_uri or self.url + JWKS}
        self.routes[DISCOVERY] = (200, json.dumps(document).encode(), {})
        headers = {"Cache-Control": cache_control} if cache_control else {}
        body = json.dumps({"keys": [_jwk(kid, key) for kid, key in keys.items()]})
        self.routes[JWKS] = (200, body.encode(), headers)


def _jwk(kid: str, key: PrivateKey) -> dict[str, Any]:
    if isinstance(key, rsa.RSAPrivateKey):
        jwk, alg = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "RS256"
    else:
        jwk, alg = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "ES256"
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


@contextlib.contextmanager
def serve_issuer() -> Iterator[Issuer]:
    """A ThreadingHTTPServer on 127.0.0.1 in a thread, answering from an ``Issuer``."""
    issuer = Issuer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            issuer.hits[self.path] += 1
            if issuer.hang is not None:
                issuer.hang.wait(timeout=30)
            if issuer.down:
                status, body, headers = 503, b"down", {}
            else:
                status, body, headers = issuer.routes.get(self.path, (404, b"", {}))
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if not issuer.omit_length:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    # A client that gives up (timeout, size limit) leaves a broken pipe behind: not an error.
    server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="test-issuer", daemon=True)
    thread.start()
    issuer.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield issuer
    finally:
        if issuer.hang is not None:
            issuer.hang.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    return {
        "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec-1": ec.generate_private_key(ec.SECP256R1()),
    }


@pytest.fixture
def issuer(keys: dict[str, PrivateKey]) -> Iterator[Issuer]:
    with serve_issuer() as running:
        running.publish({"rsa-1": keys["rsa-1"], "ec-1": keys["ec-1"]})
        yield running


def provider(server: Issuer, clock: FakeClock, **options: Any) -> JwtProvider:
    raw = {"algorithms": ["RS256", "ES256"], "audience": AUD, **options}
    if "jwks_url" not in raw:
        raw.setdefault("issuer_url", server.url)
    return JwtProvider(msgspec.convert(raw, JwtOptions), clock=clock)


def token(key: PrivateKey, kid: str | None, iss: str | None, **claims: Any) -> str:
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "ES256"
    now = int(time.time())
    body = {"sub": "alice", "aud": AUD, "exp": now + 300, "roles": ["user"], **claims}
    if iss is not None:
        body["iss"] = iss
    return jwt.encode(body, key, algorithm=alg, headers={} if kid is None else {"kid": kid})


async def auth(provider: JwtProvider, credential: str) -> Principal | None:
    return await provider.authenticate(Credentials("Bearer", credential, "127.0.0.1"))


async def test_discovery_finds_the_keys_and_rs256_and_es256_tokens_pass(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    jwt_provider = provider(issuer, fake_clock)
    for kid in ("rsa-1", "ec-1", "rsa-1"):
        principal = await auth(jwt_provider, token(keys[kid], kid, issuer.url))
        assert principal is not None and principal.id == "jwt:alice"
    assert issuer.hits == {DISCOVERY: 1, JWKS: 1}  # cached after the first token


async def test_a_jwks_url_needs_no_discovery(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    jwt_provider = provider(issuer, fake_clock, jwks_url=issuer.url + JWKS)
    assert await auth(jwt_provider, token(keys["rsa-1"], "rsa-1", "https://any.example/"))
    assert issuer.hits == {JWKS: 1}


async def test_the_issuer_is_checked_against_issuer_url_unless_issuer_is_set(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    rs = keys["rsa-1"]
    with pytest.raises(UnauthorizedError, match="issuer not accepted"):
        await auth(provider(issuer, fake_clock), token(rs, "rsa-1", "https://evil.example/"))
    with pytest.raises(UnauthorizedError, match="'iss' claim"):
        await auth(provider(issuer, fake_clock), token(rs, "rsa-1", None))
    explicit = provider(issuer, fake_clock, issuer="https://sso.example/")
    assert await auth(explicit, token(rs, "rsa-1", "https://sso.example/"))
    with pytest.raises(UnauthorizedError, match="issuer not accepted"):
        await auth(explicit, token(rs, "rsa-1", issuer.url))


async def test_a_discovery_document_for_another_issuer_is_not_trusted(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    issuer.publish({"rsa-1": keys["rsa-1"]}, issuer="https://evil.example/")
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(provider(issuer, fake_clock), token(keys["rsa-1"], "rsa-1", issuer.url))
    assert issuer.hits == {DISCOVERY: 1}


async def test_an_unknown_kid_refetches_once_and_rotation_works(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    old, new = keys["rsa-1"], keys["rsa-2"]
    jwt_provider = provider(issuer, fake_clock)
    assert await auth(jwt_provider, token(old, "rsa-1", issuer.url))
    issuer.publish({"rsa-1": old, "rsa-2": new})  # the issuer adds rsa-2 ...
    fake_clock.advance(31)
    assert await auth(jwt_provider, token(new, "rsa-2", issuer.url))
    assert issuer.hits[JWKS] == 2  # exactly one refetch for the unknown kid
    assert await auth(jwt_provider, token(new, "rsa-2", issuer.url))
    assert issuer.hits[JWKS] == 2
    issuer.publish({"rsa-2": new})  # ... and later retires rsa-1
    assert await auth(jwt_provider, token(old, "rsa-1", issuer.url))  # still cached
    fake_clock.advance(300)  # the cache expires: the next token refetches
    with pytest.raises(UnauthorizedError, match="unknown key"):
        await auth(jwt_provider, token(old, "rsa-1", issuer.url))
    assert issuer.hits[JWKS] == 3
    with pytest.raises(UnauthorizedError, match="signature invalid"):  # a forged kid
        await auth(jwt_provider, token(old, "rsa-2", issuer.url))
    assert issuer.hits[DISCOVERY] == 1


async def test_a_flood_of_unknown_kids_refetches_at_most_once_per_interval(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    jwt_provider = provider(issuer, fake_clock, jwks_min_refresh_s=30)
    assert await auth(jwt_provider, token(keys["rsa-1"], "rsa-1", issuer.url))

    async def flood(n: int) -> None:
        forged = [token(keys["rsa-2"], uuid.uuid4().hex, issuer.url) for _ in range(n)]
        results = await asyncio.gather(*(auth(jwt_provider, t) for t in forged),
                                       return_exceptions=True)
        assert all(isinstance(r, UnauthorizedError) for r in results)

    await flood(20)  # within the interval of the first fetch
    assert issuer.hits[JWKS] == 1
    fake_clock.advance(30)
    await flood(50)  # concurrent: one fetch, the rest wait for it
    await flood(50)
    assert issuer.hits[JWKS] == 2
    fake_clock.advance(29)
    await flood(20)
    assert issuer.hits[JWKS] == 2
    fake_clock.advance(1)
    await flood(20)
    assert issuer.hits[JWKS] == 3
    assert await auth(jwt_provider, token(keys["rsa-1"], "rsa-1", issuer.url))


async def test_issuer_down_with_nothing_cached_fails_closed(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuer.down = True
    jwt_provider = provider(issuer, fake_clock)
    good = token(keys["rsa-1"], "rsa-1", issuer.url)
    with caplog.at_level(logging.WARNING, logger="modelyard.plugins._jwks"):
        with pytest.raises(UnauthorizedError, match="signing keys unavailable") as refused:
            await auth(jwt_provider, good)
    assert issuer.url not in refused.value.detail  # the reason is logged, not told
    assert f"{issuer.url}{DISCOVERY}: HTTP 503" in caplog.text
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(jwt_provider, good)
    assert issuer.hits == {DISCOVERY: 1}  # no retry inside the interval
    issuer.down = False
    fake_clock.advance(30)
    assert await auth(jwt_provider, good)


async def test_nothing_listening_fails_closed(
    keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks"
    jwt_provider = JwtProvider(JwtOptions(jwks_url=url, audience=AUD), clock=fake_clock)
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(jwt_provider, token(keys["rsa-1"], "rsa-1", "https://sso.example/"))


async def test_a_hung_issuer_times_out_and_fails_closed(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    issuer.hang = threading.Event()
    jwt_provider = provider(issuer, fake_clock, jwks_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(jwt_provider, token(keys["rsa-1"], "rsa-1", issuer.url))
    assert time.monotonic() - started < 5


async def test_issuer_down_serves_the_stale_key_set_for_jwks_stale_s_then_fails_closed(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    jwt_provider = provider(issuer, fake_clock, jwks_cache_s=300, jwks_stale_s=3600)
    good = token(keys["rsa-1"], "rsa-1", issuer.url)
    assert await auth(jwt_provider, good)
    issuer.down = True
    fake_clock.advance(300)  # expired: the refresh fails, the stale set answers
    assert await auth(jwt_provider, good)
    assert issuer.hits[JWKS] == 2
    fake_clock.advance(3599)
    assert await auth(jwt_provider, good)
    with pytest.raises(UnauthorizedError, match="unknown key"):  # stale, but still no such kid
        await auth(jwt_provider, token(keys["rsa-2"], "rsa-2", issuer.url))
    fake_clock.advance(1)
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(jwt_provider, good)
    issuer.down = False
    fake_clock.advance(30)
    assert await auth(jwt_provider, good)


async def test_cache_control_max_age_shortens_the_cache(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    issuer.publish({"rsa-1": keys["rsa-1"]}, cache_control="public, max-age=60")
    jwt_provider = provider(issuer, fake_clock)
    good = token(keys["rsa-1"], "rsa-1", issuer.url)
    assert await auth(jwt_provider, good)
    fake_clock.advance(59)
    assert await auth(jwt_provider, good)
    assert issuer.hits[JWKS] == 1
    fake_clock.advance(1)
    assert await auth(jwt_provider, good)
    assert issuer.hits[JWKS] == 2


@pytest.mark.parametrize("omit_length", [False, True], ids=["content-length", "streamed"])
async def test_an_oversized_key_set_is_refused(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock, omit_length: bool
) -> None:
    jwk = _jwk("rsa-1", keys["rsa-1"])
    padded = json.dumps({"keys": [jwk], "padding": "x" * MAX_JWKS_BYTES}).encode()
    issuer.routes[JWKS] = (200, padded, {})
    issuer.omit_length = omit_length
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(provider(issuer, fake_clock), token(keys["rsa-1"], "rsa-1", issuer.url))


async def test_a_key_set_with_too_many_keys_is_refused(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    jwk = _jwk("k", keys["rsa-1"])
    many = [{**jwk, "kid": f"k{i}"} for i in range(MAX_JWKS_KEYS + 1)]
    issuer.routes[JWKS] = (200, json.dumps({"keys": many}).encode(), {})
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(provider(issuer, fake_clock), token(keys["rsa-1"], "k1", issuer.url))


async def test_encryption_and_symmetric_keys_in_the_set_are_ignored(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    entries = [{**_jwk("enc", keys["rsa-1"]), "use": "enc"},
               {"kty": "oct", "kid": "oct", "k": "c2VjcmV0", "alg": "HS256"},
               _jwk("ec-1", keys["ec-1"])]
    issuer.routes[JWKS] = (200, json.dumps({"keys": entries}).encode(), {})
    jwt_provider = provider(issuer, fake_clock)
    with pytest.raises(UnauthorizedError, match="unknown key"):
        await auth(jwt_provider, token(keys["rsa-1"], "enc", issuer.url))
    assert await auth(jwt_provider, token(keys["ec-1"], "ec-1", issuer.url))


async def test_a_plain_http_jwks_uri_to_another_host_is_not_followed(
    issuer: Issuer, keys: dict[str, PrivateKey], fake_clock: FakeClock
) -> None:
    issuer.publish({"rsa-1": keys["rsa-1"]}, jwks_uri="http://idp.example.com/jwks")
    with pytest.raises(UnauthorizedError, match="signing keys unavailable"):
        await auth(provider(issuer, fake_clock), token(keys["rsa-1"], "rsa-1", issuer.url))
    assert issuer.hits == {DISCOVERY: 1}


@pytest.mark.parametrize("url", [
    "https://sso.example.com/realms/ml", "http://127.0.0.1:8080", "http://127.9.9.9/",
    "http://localhost:9000/", "http://[::1]:9000/",
])
def test_https_or_loopback_http_urls_are_accepted(url: str) -> None:
    assert msgspec.convert({"jwks_url": url}, JwtOptions).jwks_url == url
    assert msgspec.convert({"issuer_url": url}, JwtOptions).expected_issuer == url


def test_config_refuses_insecure_urls_and_confused_key_sources() -> None:
    def refused(raw: dict[str, Any], match: str) -> None:
        with pytest.raises(msgspec.ValidationError, match=match):
            msgspec.convert(raw, JwtOptions)

    refused({"jwks_url": "http://idp.example.com/jwks"}, "plain http is only allowed")
    refused({"issuer_url": "http://10.0.0.1/realms/ml"}, "plain http is only allowed")
    refused({"issuer_url": "ftp://idp.example.com/"}, "not an http")
    refused({"jwks_url": "https://a.example/jwks", "issuer_url": "https://a.example/"},
            "one key source, not jwks_url and issuer_url")
    refused({"jwks_file": "/etc/jwks.json", "jwks_url": "https://a.example/jwks"},
            "one key source")
    refused({"issuer_url": "https://a.example/", "jwks_timeout_s": 0}, "jwks_timeout_s")
    refused({"issuer_url": "https://a.example/", "jwks_uri": "https://a.example/"},
            "unknown field `jwks_uri`")
    allowed = {"jwks_url": "http://idp.example.com/jwks", "allow_insecure_http": True}
    assert msgspec.convert(allowed, JwtOptions).allow_insecure_http
    defaults = msgspec.convert({"issuer_url": "https://a.example/"}, JwtOptions)
    assert (defaults.jwks_timeout_s, defaults.jwks_cache_s, defaults.jwks_min_refresh_s,
            defaults.jwks_stale_s) == (5, 300, 30, 3600)


# -- through the real app ------------------------------------------------------------------

@pytest.fixture
async def app_client(
    issuer: Issuer, tmp_path: Path, plugin_host: PluginHost,
    make_settings: Callable[..., Settings],
) -> AsyncIterator[httpx.AsyncClient]:
    plugin_host.register(auth_plugin, name="auth", source="modelyard")
    try:
        options = {"algorithms": ["RS256", "ES256"], "issuer_url": issuer.url, "audience": AUD}
        settings = make_settings(
            models=[{"name": "echo", "backend": "echo", "source": ".", "task": "chat"}],
            auth={"providers": [{"provider": "jwt", "options": options}],
                  "audit_log": str(tmp_path / "audit.jsonl")},
        )
        service = InferenceService(settings, plugin_host)
        app = create_app(settings, plugins=plugin_host, service=service)
        await service.start()
        try:
            await service.wait_until_loaded()
            transport = httpx.ASGITransport(app=app, client=("10.9.8.7", 4000))
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
                yield c
        finally:
            await service.stop()
    finally:
        plugin_host.unregister("auth")


async def test_the_app_accepts_an_issuers_token_and_refuses_others(
    app_client: httpx.AsyncClient, issuer: Issuer, keys: dict[str, PrivateKey]
) -> None:
    def bearer(credential: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {credential}"}

    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    good = token(keys["ec-1"], "ec-1", issuer.url)
    answer = await app_client.post("/v1/chat/completions", json=body, headers=bearer(good))
    assert answer.status_code == 200, answer.text
    forged = token(keys["rsa-2"], "rsa-2", issuer.url)
    refused = await app_client.get("/v1/models", headers=bearer(forged))
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    assert "unknown key" in refused.json()["detail"] and issuer.url not in refused.text
    assert issuer.hits == {DISCOVERY: 1, JWKS: 1}
