"""JWT bearer tokens: HS256/RS256, issuer, audience, expiry, leeway, claims, JWKS rotation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from modelyard.core.auth import Credentials
from modelyard.core.errors import ConfigError, UnauthorizedError
from modelyard.plugins.jwt import JwtOptions, JwtProvider

SECRET = "s" * 32
ISS, AUD = "https://sso.example.com/", "modelyard"


@pytest.fixture(scope="module")
def rsa_keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"sub": "alice", "iss": ISS, "aud": AUD, "iat": now, "exp": now + 300,
              "roles": ["user"], "models": ["echo"], "tenant": "acme"}
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _hs(**overrides: Any) -> JwtProvider:
    raw = {"algorithms": ["HS256"], "secret": SECRET, "issuer": ISS, "audience": AUD, **overrides}
    return JwtProvider(msgspec.convert(raw, JwtOptions))


async def _auth(provider: JwtProvider, token: str) -> Any:
    return await provider.authenticate(Credentials("Bearer", token, "127.0.0.1"))


async def test_a_valid_hs256_token_gives_its_principal() -> None:
    principal = await _auth(_hs(), jwt.encode(_claims(), SECRET, algorithm="HS256"))
    assert principal.id == "jwt:alice"
    assert principal.roles == {"user"} and principal.model_scopes == {"echo"}
    assert principal.tenant == "acme"


# Claims are built when the test runs, not when it is collected: a long suite would otherwise
# let every token here expire first (each then refused as "token expired").
@pytest.mark.parametrize(("overrides", "key", "reason"), [
    (lambda now: {"aud": "someone-else"}, SECRET, "audience"),
    (lambda now: {"iss": "https://evil.example.com/"}, SECRET, "issuer"),
    (lambda now: {"exp": now - 3600}, SECRET, "expired"),
    (lambda now: {}, "t" * 32, "signature"),
    (lambda now: {"aud": None}, SECRET, "'aud' claim"),
    (lambda now: {"exp": None}, SECRET, "'exp' claim"),
    (lambda now: {"nbf": now + 3600}, SECRET, "not valid yet"),
])
async def test_bad_tokens_are_refused_with_the_reason(
    overrides: Any, key: str, reason: str
) -> None:
    claims = _claims(**overrides(int(time.time())))
    with pytest.raises(UnauthorizedError, match=reason):
        await _auth(_hs(), jwt.encode(claims, key, algorithm="HS256"))


async def test_leeway_accepts_a_token_just_past_its_expiry() -> None:
    token = jwt.encode(_claims(exp=int(time.time()) - 10), SECRET, algorithm="HS256")
    assert (await _auth(_hs(leeway_s=60), token)).id == "jwt:alice"
    with pytest.raises(UnauthorizedError, match="expired"):
        await _auth(_hs(leeway_s=0), token)


async def test_an_algorithm_not_configured_is_refused(rsa_keys: list[rsa.RSAPrivateKey]) -> None:
    token = jwt.encode(_claims(), rsa_keys[0], algorithm="RS256")
    with pytest.raises(UnauthorizedError, match="algorithm 'RS256'"):
        await _auth(_hs(), token)
    unsigned = jwt.encode(_claims(), None, algorithm="none")
    with pytest.raises(UnauthorizedError, match="algorithm 'none'"):
        await _auth(_hs(), unsigned)


async def test_other_credentials_are_not_this_providers() -> None:
    provider = _hs()
    assert await _auth(provider, "my_0123456789abcdef_secret") is None
    assert await provider.authenticate(Credentials("Basic", "eyJ.a.b")) is None


async def test_claims_are_configurable_and_roles_mapped() -> None:
    provider = _hs(roles_claim="realm_access.roles", models_claim="scope", tenant_claim="org",
                   role_map={"ml-admins": "admin"})
    claims = _claims(roles=None, models=None, tenant=None,
                     realm_access={"roles": ["ml-admins", "other"]}, scope="chat-* echo",
                     org="acme")
    principal = await _auth(provider, jwt.encode(claims, SECRET, algorithm="HS256"))
    assert principal.roles == {"admin"}  # unknown roles are dropped
    assert principal.model_scopes == {"chat-*", "echo"}
    assert principal.tenant == "acme"


async def test_absent_model_and_tenant_claims_mean_every_model_and_the_subject() -> None:
    token = jwt.encode(_claims(models=None, tenant=None), SECRET, algorithm="HS256")
    principal = await _auth(_hs(), token)
    assert principal.model_scopes is None and principal.tenant == "alice"


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _jwks(path: Path, keys: dict[str, rsa.RSAPrivateKey], stamp: int) -> None:
    entries = []
    for kid, key in keys.items():
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        entries.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    path.write_text(json.dumps({"keys": entries}))
    os.utime(path, ns=(stamp, stamp))  # a distinct mtime, as a rotation job's rewrite has


async def test_rs256_with_a_pem_public_key(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    (tmp_path / "pub.pem").write_bytes(_pem(rsa_keys[0]))
    provider = JwtProvider(
        JwtOptions(public_key_file=str(tmp_path / "pub.pem"), issuer=ISS, audience=AUD)
    )
    assert (
        await _auth(provider, jwt.encode(_claims(), rsa_keys[0], algorithm="RS256"))
    ).id == "jwt:alice"
    with pytest.raises(UnauthorizedError, match="signature"):
        await _auth(provider, jwt.encode(_claims(), rsa_keys[1], algorithm="RS256"))


async def test_jwks_rotation_is_picked_up_from_the_file(
    tmp_path: Path, rsa_keys: list[rsa.RSAPrivateKey]
) -> None:
    old, new = rsa_keys
    path = tmp_path / "jwks.json"
    _jwks(path, {"k1": old}, stamp=1_000_000_000)
    provider = JwtProvider(JwtOptions(jwks_file=str(path), issuer=ISS, audience=AUD))

    def token(key: rsa.RSAPrivateKey, kid: str) -> str:
        return jwt.encode(_claims(), key, algorithm="RS256", headers={"kid": kid})

    assert (await _auth(provider, token(old, "k1"))).id == "jwt:alice"
    with pytest.raises(UnauthorizedError, match="unknown key"):
        await _auth(provider, token(new, "k2"))
    _jwks(path, {"k1": old, "k2": new}, stamp=2_000_000_000)  # the rotation adds k2 ...
    assert (await _auth(provider, token(new, "k2"))).id == "jwt:alice"
    _jwks(path, {"k2": new}, stamp=3_000_000_000)  # ... and later retires k1
    with pytest.raises(UnauthorizedError, match="unknown key"):
        await _auth(provider, token(old, "k1"))
    with pytest.raises(UnauthorizedError, match="signature"):  # a forged kid does not help
        await _auth(provider, token(old, "k2"))


def test_options_are_checked() -> None:
    with pytest.raises(msgspec.ValidationError, match="secret"):
        msgspec.convert({"algorithms": ["HS256"]}, JwtOptions)
    with pytest.raises(msgspec.ValidationError, match="public_key_file or jwks_file"):
        msgspec.convert({"algorithms": ["RS256"]}, JwtOptions)
    with pytest.raises(msgspec.ValidationError, match="unknown role"):
        msgspec.convert(
            {"secret": SECRET, "algorithms": ["HS256"], "role_map": {"g": "root"}}, JwtOptions
        )
    with pytest.raises(ConfigError, match="jwt provider"):
        JwtProvider(JwtOptions(public_key_file="/nonexistent/pub.pem"))
