"""API key administration over HTTP for the console: create (the key shown once), list, revoke.

The same database and rules as ``modelyard keys`` (plugins/apikeys.py): only the id and a
keyed hash are stored, a revocation applies to the next request, and ``key.create`` /
``key.revoke`` go to the audit log with the admin who did it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Literal

from msgspec import Meta, Struct

from modelyard.api.security import Security
from modelyard.core.auth import Principal
from modelyard.core.errors import ConflictError, NotFoundError
from modelyard.plugins.apikeys import ApiKeyProvider, ApiKeyRecord, KeyStore

__all__ = ["IssuedKeyView", "KeyAdmin", "KeyCreateBody", "KeyList", "KeyView"]

Role = Literal["admin", "operator", "user", "viewer"]
KeyStatus = Literal["active", "expired", "revoked"]
_STATUSES: dict[str, KeyStatus] = {"active": "active", "expired": "expired", "revoked": "revoked"}
_DAY_S = 86400.0


class KeyCreateBody(Struct, forbid_unknown_fields=True, kw_only=True):
    """A new key: what it is for, its roles, optionally its models and lifetime."""

    name: Annotated[str, Meta(min_length=1, max_length=100)]
    roles: Annotated[list[Role], Meta(min_length=1, max_length=4)]
    #: Model names or ``fnmatch`` patterns the key may use; absent: every model.
    models: Annotated[list[str], Meta(min_length=1, max_length=100)] | None = None
    #: Lifetime in days; absent: no expiry.
    expires_in_days: Annotated[int, Meta(ge=1, le=3650)] | None = None


class KeyView(Struct, frozen=True, kw_only=True):
    """What is stored about a key (never its secret) and whether it works now."""

    id: str
    name: str
    roles: list[str]
    models: list[str] | None
    tenant: str
    status: KeyStatus
    created_at: float
    expires_at: float | None
    revoked_at: float | None


class IssuedKeyView(Struct, frozen=True, kw_only=True):
    """A new key: ``key`` is its only copy; it cannot be shown again."""

    key: str
    record: KeyView


class KeyList(Struct, frozen=True, kw_only=True):
    keys: list[KeyView]


def _view(record: ApiKeyRecord, now: float) -> KeyView:
    return KeyView(
        id=record.id, name=record.name, roles=list(record.roles),
        models=None if record.models is None else list(record.models), tenant=record.tenant,
        status=_STATUSES[record.status(now)], created_at=record.created_at,
        expires_at=record.expires_at, revoked_at=record.revoked_at,
    )


class KeyAdmin:
    """Key management on the database of the server's ``apikeys`` auth provider."""

    def __init__(self, security: Security, *, wall: Callable[[], float] = time.time) -> None:
        self.security = security
        self._wall = wall

    @property
    def available(self) -> bool:
        return self._store_or_none() is not None

    def _store_or_none(self) -> KeyStore | None:
        for provider in self.security.providers:
            if isinstance(provider, ApiKeyProvider):
                return provider.store
        return None

    def _store(self) -> KeyStore:
        store = self._store_or_none()
        if store is None:
            raise ConflictError(
                "API keys are not configured on this server: add "
                '[[auth.providers]] provider = "apikeys"'
            )
        return store

    async def list(self) -> KeyList:
        records = await asyncio.to_thread(self._store().list)
        now = self._wall()
        return KeyList(keys=[_view(r, now) for r in records])

    async def create(self, body: KeyCreateBody, principal: Principal, client: str) -> IssuedKeyView:
        store = self._store()
        expires = None if body.expires_in_days is None else (
            self._wall() + body.expires_in_days * _DAY_S
        )
        issued = await asyncio.to_thread(
            lambda: store.create(name=body.name, roles=body.roles, models=body.models,
                                 expires_at=expires)
        )
        record = issued.record
        self.security.audit.record(
            "key.create", result="ok", principal=principal.id, target=f"key:{record.id}",
            client=client, detail=f"name={record.name} roles={','.join(record.roles)}",
        )
        return IssuedKeyView(key=issued.key, record=_view(record, self._wall()))

    async def revoke(self, key_id: str, principal: Principal, client: str) -> KeyView:
        store = self._store()
        try:
            record = await asyncio.to_thread(store.revoke, key_id)
        except KeyError:
            raise NotFoundError(f"no API key with id {key_id!r}") from None
        self.security.audit.record(
            "key.revoke", result="ok", principal=principal.id, target=f"key:{key_id}",
            client=client,
        )
        return _view(record, self._wall())
