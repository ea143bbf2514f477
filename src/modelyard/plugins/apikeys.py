"""API keys: ``my_<id>_<secret>``; only the id and an HMAC of the secret are stored (SQLite)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgspec
import platformdirs
from msgspec import Struct

from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.auth_settings import ROLES
from modelyard.core.errors import ConfigError, UnauthorizedError
from modelyard.core.ratelimit import LimitedPrincipal, RateLimit

__all__ = [
    "KEY_PREFIX",
    "ApiKeyOptions",
    "ApiKeyProvider",
    "ApiKeyRecord",
    "InvalidKey",
    "IssuedKey",
    "KeyStore",
]

#: Every key starts with this: secret scanners and log redaction can recognise it.
KEY_PREFIX = "my_"
_ID_BYTES = 8  # 64-bit public lookup id
_SECRET_BYTES = 32  # 256 bits of randomness in the secret part
_KEY_SHAPE = re.compile(r"^my_(?P<id>[0-9a-f]{16})_(?P<secret>[A-Za-z0-9_-]{43})$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    digest      BLOB NOT NULL,
    roles       TEXT NOT NULL,
    models      TEXT,
    tenant      TEXT NOT NULL,
    rate_limit  TEXT,
    created_at  REAL NOT NULL,
    expires_at  REAL,
    revoked_at  REAL
)
"""


class ApiKeyOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``apikeys`` provider."""

    #: The SQLite file; default ``<user data dir>/modelyard/keys.sqlite3``.
    database: str | None = None
    #: The HMAC key (32 random bytes); default ``<database>.secret``, created 0600 on first use.
    #: Without it a copy of the database cannot check, let alone recover, any key.
    secret_file: str | None = None


class ApiKeyRecord(Struct, frozen=True, kw_only=True):
    """What is stored about a key (never the key itself)."""

    id: str
    name: str
    roles: tuple[str, ...]
    #: None: every model.
    models: tuple[str, ...] | None
    tenant: str
    rate_limit: RateLimit | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


class IssuedKey(Struct, frozen=True):
    """A new key: ``key`` is shown once and never stored."""

    key: str
    record: ApiKeyRecord


class InvalidKey(Exception):
    """The credential is a modelyard key but not a valid one; ``reason`` is safe to show."""

    def __init__(self, reason: str, key_id: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.key_id = key_id


class KeyStore:
    """The key database. Checks share one autocommit connection (each read sees the latest
    commit, so a revocation by the CLI applies to a running server's next request); changes
    open their own."""

    def __init__(
        self, path: Path, secret: bytes, *, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < 32:
            raise ConfigError("the API key secret must be at least 32 bytes")
        self.path = path
        self._secret = secret
        self._clock = clock
        _create_private(path)
        with self._connect() as db:
            db.execute(_SCHEMA)
        # Opening a connection costs more than the lookup itself; checks run in worker threads.
        self._reader = sqlite3.connect(
            path, timeout=10, check_same_thread=False, isolation_level=None
        )
        self._reader_lock = threading.Lock()

    @classmethod
    def open(cls, options: ApiKeyOptions, *, clock: Callable[[], float] = time.time) -> KeyStore:
        path = Path(options.database).expanduser() if options.database else default_database()
        secret_path = (
            Path(options.secret_file).expanduser() if options.secret_file
            else path.with_name(path.name + ".secret")
        )
        return cls(path, _load_or_create_secret(secret_path), clock=clock)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=10)) as db, db:
            yield db

    def _digest(self, key_id: str, secret: str) -> bytes:
        # The id is inside the MAC: a stored digest cannot be moved to another row.
        return hmac.new(self._secret, f"{key_id}.{secret}".encode(), hashlib.sha256).digest()

    # -- management ----------------------------------------------------------------------

    def create(
        self,
        *,
        name: str,
        roles: Iterable[str],
        models: Iterable[str] | None = None,
        tenant: str | None = None,
        expires_at: float | None = None,
        rate_limit: RateLimit | None = None,
    ) -> IssuedKey:
        """Issue a key; the returned ``key`` is the only copy of its secret."""
        role_list = tuple(sorted(set(roles)))
        unknown = [r for r in role_list if r not in ROLES]
        if not role_list or unknown:
            raise ValueError(f"roles must be some of {', '.join(ROLES)}; got {list(role_list)}")
        key_id = secrets.token_hex(_ID_BYTES)
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        record = ApiKeyRecord(
            id=key_id, name=name, roles=role_list,
            models=None if models is None else tuple(sorted(set(models))),
            tenant=tenant or key_id, rate_limit=rate_limit, created_at=self._clock(),
            expires_at=expires_at, revoked_at=None,
        )
        with self._connect() as db:
            db.execute(
                "INSERT INTO api_keys (id, name, digest, roles, models, tenant, rate_limit,"
                " created_at, expires_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    key_id, name, self._digest(key_id, secret), _json(record.roles),
                    None if record.models is None else _json(record.models), record.tenant,
                    None if rate_limit is None else _json(rate_limit), record.created_at,
                    expires_at,
                ),
            )
        return IssuedKey(f"{KEY_PREFIX}{key_id}_{secret}", record)

    def list(self) -> list[ApiKeyRecord]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id").fetchall()
        return [_record(row) for row in rows]

    def get(self, key_id: str) -> ApiKeyRecord | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return None if row is None else _record(row)

    def revoke(self, key_id: str) -> ApiKeyRecord:
        """Revoke a key at once; revoking twice keeps the first time. KeyError if unknown."""
        with self._connect() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (self._clock(), key_id),
            )
        record = self.get(key_id)
        if record is None:
            raise KeyError(key_id)
        return record

    # -- verification --------------------------------------------------------------------

    def verify(self, key: str) -> ApiKeyRecord:
        """The record of a valid key; InvalidKey (with a reason) for anything else."""
        match = _KEY_SHAPE.match(key)
        if match is None:
            raise InvalidKey("is malformed")
        key_id, secret = match["id"], match["secret"]
        with self._reader_lock:
            row = self._reader.execute(
                f"SELECT {_COLUMNS}, digest FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        expected = row[-1] if row is not None else b"\0" * 32
        # Compare even for an unknown id, so timing does not say which ids exist.
        matches = hmac.compare_digest(self._digest(key_id, secret), expected)
        if row is None or not matches:
            raise InvalidKey("is not valid", key_id)
        record = _record(row[:-1])
        status = record.status(self._clock())
        if status != "active":
            raise InvalidKey(f"is {status}", key_id)
        return record


_COLUMNS = "id, name, roles, models, tenant, rate_limit, created_at, expires_at, revoked_at"


def _json(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _record(row: tuple[object, ...]) -> ApiKeyRecord:
    key_id, name, roles, models, tenant, rate_limit, created, expires, revoked = row
    return ApiKeyRecord(
        id=str(key_id), name=str(name),
        roles=tuple(msgspec.json.decode(str(roles), type=list[str])),
        models=None if models is None else tuple(msgspec.json.decode(str(models), type=list[str])),
        tenant=str(tenant),
        rate_limit=(
            None if rate_limit is None else msgspec.json.decode(str(rate_limit), type=RateLimit)
        ),
        created_at=float(created),  # type: ignore[arg-type]
        expires_at=None if expires is None else float(expires),  # type: ignore[arg-type]
        revoked_at=None if revoked is None else float(revoked),  # type: ignore[arg-type]
    )


def default_database() -> Path:
    return Path(platformdirs.user_data_dir("modelyard")) / "keys.sqlite3"


def _create_private(path: Path) -> None:
    """Create the file 0600 (and a missing parent 0700) before SQLite creates it 0644."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _load_or_create_secret(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    secret = secrets.token_bytes(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its secret
        return path.read_bytes()
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    return secret


class ApiKeyProvider(AuthProvider):
    """Recognises ``Bearer my_…`` credentials and checks them against the key database."""

    name = "apikeys"
    options_type = ApiKeyOptions

    def __init__(self, options: ApiKeyOptions, *, clock: Callable[[], float] = time.time) -> None:
        super().__init__(options)
        self.store = KeyStore.open(options, clock=clock)

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        if credentials.scheme.lower() != "bearer" or not credentials.token.startswith(KEY_PREFIX):
            return None
        try:
            record = await asyncio.to_thread(self.store.verify, credentials.token)
        except InvalidKey as exc:
            which = f"API key {exc.key_id}" if exc.key_id else "API key"  # the id is not secret
            raise UnauthorizedError(f"{which} {exc.reason}") from None
        return LimitedPrincipal(
            id=f"key:{record.id}", roles=frozenset(record.roles),
            model_scopes=None if record.models is None else frozenset(record.models),
            tenant=record.tenant, rate_limit=record.rate_limit,
        )
