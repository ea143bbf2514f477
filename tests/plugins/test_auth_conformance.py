"""The API-key and JWT providers pass the conformance kit plugin authors run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import jwt

from modelyard import AuthProvider, Credentials
from modelyard.plugins.apikeys import ApiKeyOptions, ApiKeyProvider
from modelyard.plugins.jwt import JwtProvider
from modelyard.testing import AuthProviderConformance

SECRET = "s" * 32
ISS, AUD = "https://sso.example.com/", "modelyard"


def _bearer(token: str) -> Credentials:
    return Credentials("Bearer", token, "127.0.0.1")


def _token(key: str = SECRET, **overrides: object) -> str:
    now = int(time.time())
    claims = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300,
              "roles": ["user"], **overrides}
    return jwt.encode(claims, key, algorithm="HS256")


class TestApiKeyConformance(AuthProviderConformance):
    provider = ApiKeyProvider
    entry_point = "auth"

    def make_provider(self, tmp_path: Path) -> AuthProvider:
        return ApiKeyProvider(ApiKeyOptions(database=str(tmp_path / "keys.sqlite3")))

    def valid_credentials(self, provider: AuthProvider) -> Credentials:
        assert isinstance(provider, ApiKeyProvider)
        return _bearer(provider.store.create(name="kit", roles=["user"]).key)

    def invalid_credentials(self, provider: AuthProvider) -> Sequence[Credentials]:
        assert isinstance(provider, ApiKeyProvider)
        key = provider.store.create(name="kit", roles=["user"]).key
        other_secret = key[:-1] + ("A" if key[-1] != "A" else "B")
        revoked = provider.store.create(name="gone", roles=["user"])
        provider.store.revoke(revoked.record.id)
        return [_bearer("my_malformed"), _bearer(other_secret), _bearer(revoked.key)]

    def foreign_credentials(self, provider: AuthProvider) -> Sequence[Credentials]:
        return [*super().foreign_credentials(provider), _bearer(_token())]


class TestJwtConformance(AuthProviderConformance):
    provider = JwtProvider
    entry_point = "auth"
    options = {"algorithms": ["HS256"], "secret": SECRET, "issuer": ISS, "audience": AUD}
    # PyJWT checks the HMAC signature; the provider itself compares no secret.
    secret_comparison_modules = ("jwt.algorithms",)

    def valid_credentials(self, provider: AuthProvider) -> Credentials:
        return _bearer(_token())

    def invalid_credentials(self, provider: AuthProvider) -> Sequence[Credentials]:
        return [
            _bearer(_token(key="t" * 32)),
            _bearer(_token(exp=int(time.time()) - 3600)),
            _bearer(_token(aud="someone-else")),
            _bearer("eyJhbGciOi.not-a.token"),
        ]

    def foreign_credentials(self, provider: AuthProvider) -> Sequence[Credentials]:
        return [*super().foreign_credentials(provider), _bearer("my_" + "0" * 16 + "_x")]
