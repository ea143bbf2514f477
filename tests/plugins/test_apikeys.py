"""API keys: typed prefix, 256-bit secrets, only an id and an HMAC stored, expiry, revocation."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from modelyard.core.auth import Credentials
from modelyard.core.errors import UnauthorizedError
from modelyard.core.ratelimit import LimitedPrincipal, RateLimit
from modelyard.plugins.apikeys import (
    ApiKeyOptions,
    ApiKeyProvider,
    InvalidKey,
    KeyStore,
)
from modelyard.testing import FakeClock


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(start=1_800_000_000.0)


@pytest.fixture
def store(tmp_path: Path, wall: FakeClock) -> KeyStore:
    return KeyStore.open(ApiKeyOptions(database=str(tmp_path / "keys.sqlite3")), clock=wall)


def _all_bytes(directory: Path) -> bytes:
    """The database and anything SQLite keeps beside it (journal, WAL)."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_a_key_has_the_typed_prefix_and_256_bits_of_secret(store: KeyStore) -> None:
    issued = store.create(name="ci", roles=["user"])
    prefix, key_id, secret = issued.key.split("_", 2)
    assert prefix == "my" and key_id == issued.record.id
    assert len(base64.urlsafe_b64decode(secret + "=")) == 32
    assert store.verify(issued.key).id == issued.record.id


def test_the_database_never_holds_the_key_or_its_secret(tmp_path: Path, store: KeyStore) -> None:
    issued = store.create(name="ci", roles=["user"], models=["echo"])
    secret = issued.key.split("_", 2)[2].encode()  # the secret may itself hold "_"
    store.verify(issued.key)
    stored = _all_bytes(tmp_path)
    assert issued.record.id.encode() in stored  # the lookup id is stored ...
    assert issued.key.encode() not in stored  # ... never the key
    assert secret[:16] not in stored  # nor any part of its secret


def test_files_are_private(tmp_path: Path, store: KeyStore) -> None:
    store.create(name="ci", roles=["user"])
    for name in ("keys.sqlite3", "keys.sqlite3.secret"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600


def test_a_copied_database_without_the_secret_checks_nothing(
    tmp_path: Path, store: KeyStore
) -> None:
    issued = store.create(name="ci", roles=["user"])
    other = KeyStore(store.path, b"x" * 32)
    with pytest.raises(InvalidKey, match="not valid"):
        other.verify(issued.key)


@pytest.mark.parametrize("mangle", [
    lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # one character of the secret
    lambda k: k.replace("my_", "my_0", 1)[:-1],  # another id
    lambda k: k + "x",  # too long
    lambda k: "my_nothex_" + k.split("_", 2)[2],
])
def test_anything_but_the_exact_key_is_refused(store: KeyStore, mangle) -> None:  # type: ignore[no-untyped-def]
    issued = store.create(name="ci", roles=["user"])
    with pytest.raises(InvalidKey):
        store.verify(mangle(issued.key))


def test_expiry_follows_the_injected_clock(store: KeyStore, wall: FakeClock) -> None:
    issued = store.create(name="temp", roles=["user"], expires_at=wall() + 60)
    wall.advance(59.999)
    assert store.verify(issued.key).status(wall()) == "active"
    wall.advance(0.001)
    with pytest.raises(InvalidKey, match="expired"):
        store.verify(issued.key)


def test_revocation_is_immediate_and_keeps_the_first_time(store: KeyStore, wall: FakeClock) -> None:
    issued = store.create(name="ci", roles=["user"])
    first = store.revoke(issued.record.id)
    wall.advance(10)
    again = store.revoke(issued.record.id)
    assert first.revoked_at == again.revoked_at == wall() - 10
    with pytest.raises(InvalidKey, match="revoked"):
        store.verify(issued.key)
    with pytest.raises(KeyError):
        store.revoke("0" * 16)


def test_records_keep_roles_scopes_tenant_and_limit(store: KeyStore) -> None:
    limit = RateLimit(rate=2, burst=5)
    issued = store.create(name="team-a", roles=["user", "viewer"], models=["chat-*", "echo"],
                          tenant="team-a", rate_limit=limit)
    (listed,) = store.list()
    assert listed == issued.record
    assert listed.roles == ("user", "viewer") and listed.models == ("chat-*", "echo")
    assert listed.tenant == "team-a" and listed.rate_limit == limit


def test_unknown_roles_are_refused(store: KeyStore) -> None:
    with pytest.raises(ValueError, match="roles"):
        store.create(name="x", roles=["root"])
    with pytest.raises(ValueError, match="roles"):
        store.create(name="x", roles=[])


async def test_the_provider_answers_only_for_its_own_kind(tmp_path: Path, wall: FakeClock) -> None:
    provider = ApiKeyProvider(ApiKeyOptions(database=str(tmp_path / "k.db")), clock=wall)
    issued = provider.store.create(name="ci", roles=["user"], models=["echo"], tenant="t1")
    principal = await provider.authenticate(Credentials("Bearer", issued.key, "10.0.0.1"))
    assert isinstance(principal, LimitedPrincipal)
    assert principal.id == f"key:{issued.record.id}"
    assert principal.roles == {"user"} and principal.model_scopes == {"echo"}
    assert principal.tenant == "t1"
    assert await provider.authenticate(Credentials("Bearer", "eyJhbGciOi.x.y")) is None
    assert await provider.authenticate(Credentials("Basic", issued.key)) is None
    provider.store.revoke(issued.record.id)
    with pytest.raises(UnauthorizedError, match=f"API key {issued.record.id} is revoked"):
        await provider.authenticate(Credentials("Bearer", issued.key))


def test_the_default_tenant_is_the_key_id(store: KeyStore) -> None:
    issued = store.create(name="ci", roles=["user"])
    assert issued.record.tenant == issued.record.id
