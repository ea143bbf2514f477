"""``modelyard keys create|list|revoke``: manage the API key database."""

from __future__ import annotations

import getpass
import re
import sys
import time
from dataclasses import dataclass

import click
import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelyard.core.audit import AuditLog
from modelyard.core.auth_settings import ROLES, AuthSettings
from modelyard.core.errors import ModelyardError
from modelyard.core.ratelimit import RateLimit
from modelyard.plugins.apikeys import ApiKeyOptions, ApiKeyRecord, KeyStore

__all__ = ["keys_cmd"]

_DURATION = re.compile(r"^(?P<n>\d+)(?P<unit>[smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


@dataclass
class _Context:
    store: KeyStore
    audit: AuditLog


def _auth_settings(config: str | None) -> AuthSettings:
    if config is None:
        return AuthSettings()
    from modelyard.core.settings import load_settings

    settings = load_settings(config)
    auth = getattr(settings, "auth", None)  # the [auth] section of Settings
    return auth if isinstance(auth, AuthSettings) else AuthSettings()


def _key_options(auth: AuthSettings, database: str | None) -> ApiKeyOptions:
    entry = next((p for p in auth.providers if p.provider == "apikeys"), None)
    options = msgspec.convert(entry.options, ApiKeyOptions) if entry else ApiKeyOptions()
    if database is not None:
        options = msgspec.structs.replace(options, database=database)
    return options


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


@click.group("keys")
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="MODELYARD_CONFIG",
              help="TOML config: its [auth] apikeys provider names the database.")
@click.option("--database", type=click.Path(dir_okay=False),
              help="The key database (overrides the config).")
@click.pass_context
def keys_cmd(ctx: click.Context, config: str | None, database: str | None) -> None:
    """Manage API keys (only their ids and keyed hashes are stored)."""
    try:
        auth = _auth_settings(config)
        ctx.obj = _Context(KeyStore.open(_key_options(auth, database)), AuditLog(auth.audit_log))
    except (ModelyardError, msgspec.ValidationError) as exc:
        detail = exc.detail if isinstance(exc, ModelyardError) else str(exc)
        click.echo(f"error: {detail}", err=True)
        sys.exit(1)


def _expiry(expires_in: str | None) -> float | None:
    if expires_in is None:
        return None
    match = _DURATION.match(expires_in)
    if match is None:
        raise click.BadParameter(
            "use a number and a unit: 90m, 12h, 30d, 8w", param_hint="--expires-in"
        )
    return time.time() + int(match["n"]) * _UNIT_S[match["unit"]]


@keys_cmd.command("create")
@click.option(
    "--name", required=True, help="What the key is for (shown in lists and the audit log)."
)
@click.option("--role", "roles", multiple=True, required=True, type=click.Choice(ROLES),
              help="A role (repeatable).")
@click.option("--model", "models", multiple=True,
              help="A model name or pattern the key may use (repeatable; default: every model).")
@click.option("--tenant", default=None, help="Cache tenant (default: the key id).")
@click.option("--expires-in", default=None, help="Lifetime, e.g. 30d (default: no expiry).")
@click.option("--rate", type=float, default=None, help="Requests per second (own rate limit).")
@click.option("--burst", type=int, default=None, help="Bucket size of the own rate limit.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def create_cmd(
    obj: _Context, name: str, roles: tuple[str, ...], models: tuple[str, ...], tenant: str | None,
    expires_in: str | None, rate: float | None, burst: int | None, as_json: bool,
) -> None:
    """Create a key and print it once: it cannot be shown again."""
    if (rate is None) != (burst is None):
        raise click.UsageError("--rate and --burst go together")
    try:
        limit = None if rate is None else msgspec.convert({"rate": rate, "burst": burst}, RateLimit)
    except msgspec.ValidationError as exc:
        raise click.UsageError(f"rate limit: {exc}") from None
    issued = obj.store.create(
        name=name, roles=roles, models=models or None, tenant=tenant,
        expires_at=_expiry(expires_in), rate_limit=limit,
    )
    obj.audit.record(
        "key.create",
        result="ok",
        principal=_actor(),
        target=f"key:{issued.record.id}",
        detail=f"name={name} roles={','.join(issued.record.roles)}",
    )
    if as_json:
        click.echo(msgspec.json.encode({"key": issued.key, **msgspec.to_builtins(issued.record)}))
        return
    click.echo(issued.key)
    click.echo(f"created key {issued.record.id} ({name}); store it now, it is not kept", err=True)


def _when(stamp: float | None) -> str:
    return "" if stamp is None else time.strftime("%Y-%m-%d %H:%M", time.gmtime(stamp))


@keys_cmd.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_cmd(obj: _Context, as_json: bool) -> None:
    """List keys: id, name, roles, models, status (never a secret)."""
    records = obj.store.list()
    now = time.time()
    if as_json:
        rows = [{**msgspec.to_builtins(r), "status": r.status(now)} for r in records]
        click.echo(msgspec.json.encode(rows))
        return
    table = Table()
    for column in ("id", "name", "roles", "models", "tenant", "status", "created", "expires"):
        table.add_column(column, no_wrap=column == "id")  # an id must stay copyable
    for r in records:
        cells = (r.id, r.name, ",".join(r.roles), _models(r), r.tenant, r.status(now),
                 _when(r.created_at), _when(r.expires_at))
        # Text cells: a name such as "[ops]" is printed as it is, never read as rich markup.
        table.add_row(*(Text(cell) for cell in cells))
    Console().print(table)


def _models(record: ApiKeyRecord) -> str:
    return "*" if record.models is None else ",".join(record.models)


@keys_cmd.command("revoke")
@click.argument("key_id")
@click.pass_obj
def revoke_cmd(obj: _Context, key_id: str) -> None:
    """Revoke KEY_ID at once (a running server refuses it from its next request)."""
    key_id = key_id.removeprefix("key:")
    try:
        record = obj.store.revoke(key_id)
    except KeyError:
        obj.audit.record(
            "key.revoke", result="not-found", principal=_actor(), target=f"key:{key_id}"
        )
        click.echo(f"error: no key {key_id!r}", err=True)
        sys.exit(1)
    obj.audit.record("key.revoke", result="ok", principal=_actor(), target=f"key:{record.id}")
    click.echo(f"revoked key {record.id} ({record.name})")

