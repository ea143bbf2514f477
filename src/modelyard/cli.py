"""The ``modelyard`` command line (click)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from modelyard._version import __version__
from modelyard.batch_cli import batch_cmd
from modelyard.core.errors import ConfigError, ModelyardError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import Settings, cache_dir_of, load_settings, resolve_models
from modelyard.core.sources import SourceResolver
from modelyard.plugins.keys_cli import keys_cmd
from modelyard.plugins.load_cli import load_cmd
from modelyard.plugins.store.commands import lock_cmd, pull_cmd, store_model_commands
from modelyard.plugins.store.lock import serve_resolver

__all__ = ["main"]

# Messages, names and paths are printed as text, never as rich markup: a message such as
# "configure [[auth.providers]]" would otherwise lose its brackets (rich reads them as tags).
console = Console(stderr=True)
out = Console()


def _cells(*values: object) -> list[Text]:
    """Table cells printed as they are (a plain str cell would be read as markup)."""
    return [Text(str(v)) for v in values]


def _plugins() -> PluginHost:
    host = PluginHost()
    host.load_entry_points()
    return host


def _settings(config: str | None, host: PluginHost) -> tuple[Settings, bool]:
    """The config file's settings, or the demo's when none is given."""
    path = config or os.environ.get("MODELYARD_CONFIG")
    if path:
        settings = _load_config(path, host)
        resolve_models(settings, host.backends, unavailable=host.unavailable())
        return settings, False
    from modelyard.demo import demo_settings

    settings, skipped = demo_settings(set(host.backends))
    for line in skipped:
        console.print(Text(f"demo: skipping {line}", style="yellow"))
    return settings, True


def _load_config(path: str, host: PluginHost) -> Settings:
    """Read a config file; the fake backends join ``host`` only when it names one."""
    from modelyard.testing.plugin import add_named_fakes

    settings = load_settings(path)
    add_named_fakes(host, settings)
    return settings


def _fail(message: str) -> None:
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="modelyard")
def cli() -> None:
    """modelyard: several inference runtimes behind one API."""


@cli.command()
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    help="TOML config file (default: the demo models).",
)
@click.option("--host", default=None, help="Bind address (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8000).")
@click.option("--log-level", default=None, type=click.Choice(["debug", "info", "warning", "error"]))
@click.option(
    "--log-format",
    default=None,
    type=click.Choice(["json", "text"]),
    help="Log lines as JSON (default) or text for a terminal.",
)
@click.option(
    "--otlp-endpoint",
    metavar="URL",
    default=None,
    help="Export traces over OTLP/HTTP, e.g. http://localhost:4318/v1/traces "
    "(needs modelyard[otel]).",
)
@click.option("--locked", is_flag=True, help="Load only what modelyard.lock beside CONFIG lists.")
@click.option("--offline", is_flag=True, help="Never touch the network (sets HF_HUB_OFFLINE=1).")
@click.option(
    "--engine", type=click.Choice(["local", "ray"]), default=None,
    help="Serve from this process (local) or over Ray Serve (ray); overrides [cluster] engine.",
)
@click.option(
    "--ray-address", metavar="ADDRESS", default=None,
    help='With --engine ray: "local" (start Ray), "auto" (join this machine\'s), or ray://HOST:PORT.',
)
def serve(
    config: str | None,
    host: str | None,
    port: int | None,
    log_level: str | None,
    log_format: str | None,
    otlp_endpoint: str | None,
    locked: bool,
    offline: bool,
    engine: str | None,
    ray_address: str | None,
) -> None:
    """Serve the models of CONFIG (or the demo models) over HTTP."""
    from modelyard.api.app import create_app
    from modelyard.api.security import check_bind
    from modelyard.api.server import serve as run_server
    from modelyard.core.logs import configure_logging
    from modelyard.core.service import InferenceService
    from modelyard.core.telemetry import Telemetry
    from modelyard.core.tracing import Tracing, otlp_provider

    plugins = _plugins()
    try:
        settings, is_demo = _settings(config, plugins)
    except ModelyardError as exc:
        _fail(exc.detail)
    server = msgspec.structs.replace(
        settings.server,
        host=host or settings.server.host,
        port=settings.server.port if port is None else port,
        log_level=log_level or settings.server.log_level,
        log_format=log_format or settings.server.log_format,
    )
    cluster = msgspec.structs.replace(
        settings.cluster,
        engine=engine or settings.cluster.engine,
        address=ray_address or settings.cluster.address,
    )
    settings = msgspec.structs.replace(settings, server=server, cluster=cluster)
    try:  # before any demo download: auth off on a non-loopback address is refused
        check_bind(settings.auth, server.host)
    except ModelyardError as exc:
        _fail(exc.detail)
    try:  # --offline holds from here on; --locked refuses a model modelyard.lock lacks
        source_resolver = serve_resolver(
            config or os.environ.get("MODELYARD_CONFIG"), settings, plugins.source_schemes,
            locked=locked, offline=offline,
        )
    except ModelyardError as exc:
        _fail(exc.detail)
    configure_logging(server.log_level, server.log_format)
    try:  # the app's lifespan flushes an OTLP provider at shutdown (SIGTERM included)
        tracing = Tracing(otlp_provider(otlp_endpoint), owned=True) if otlp_endpoint else Tracing()
    except ModelyardError as exc:
        _fail(exc.detail)
    if is_demo:
        prepare_demo_models(settings, plugins)
    telemetry = Telemetry(tracing=tracing, log_prompts=server.log_prompts)
    service = InferenceService(
        settings, plugins, telemetry=telemetry, source_resolver=source_resolver
    )
    try:
        app = create_app(settings, plugins=plugins, service=service)
    except ModelyardError as exc:  # an unknown auth provider, a JWT key file missing, ...
        _fail(exc.detail)
    console.print(
        f"modelyard {__version__} on http://{server.host}:{server.port}",
        highlight=False, markup=False,
    )
    run_server(app, service, server)


def prepare_demo_models(settings: Settings, host: PluginHost) -> None:
    """Prepare every demo model in the foreground with a progress display (cached after)."""
    resolve_source = SourceResolver(host.source_schemes)
    cache_dir = cache_dir_of(settings)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        for model in settings.models:
            task = bar.add_task(f"{escape(model.name)}: checking", total=100)

            def report(
                phase: str, percent: float, task: Any = task, name: str = model.name
            ) -> None:
                bar.update(task, description=f"{escape(name)}: {escape(phase)}",
                           completed=percent)

            try:
                resolve_source(model.source, cache_dir, report)
            except ModelyardError as exc:
                bar.update(
                    task, description=f"{escape(model.name)}: [red]{escape(exc.detail)}[/red]"
                )
                continue
            bar.update(task, description=f"{escape(model.name)}: ready", completed=100)


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def plugins_cmd(as_json: bool) -> None:
    """List plugins: loaded, skipped, or failed with the error."""
    host = _plugins()
    if as_json:
        click.echo(msgspec.json.encode([msgspec.to_builtins(r) for r in host.records]).decode())
        return
    table = Table("plugin", "status", "source", "provides", "error")
    for r in host.records:
        provides = ", ".join(
            [f"backend:{b}" for b in r.backends]
            + [f"auth:{a}" for a in r.auth_providers]
            + [f"cache:{c}" for c in r.cache_tiers]
            + [f"source:{s}" for s in r.source_schemes]
        )
        table.add_row(*_cells(r.name, r.status, f"{r.source} {r.version}".strip(), provides,
                              r.error))
    out.print(table)


@cli.group("models", invoke_without_command=True)
@click.option("--config", "-c", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--url", help="Ask a running server (e.g. http://127.0.0.1:8000) for live states.")
@click.pass_context
def models_cmd(ctx: click.Context, config: str | None, url: str | None) -> None:
    """List models (configured, or live from a server with --url)."""
    if ctx.invoked_subcommand is not None:
        return
    if url:
        import httpx

        try:
            response = httpx.get(url.rstrip("/") + "/admin/models", timeout=10)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            _fail(f"cannot reach {url}: {exc}")
        rows = [v for m in response.json()["models"] for v in m["versions"]]
        table = Table("model", "version", "backend", "task", "state", "progress", "details")
        for v in rows:
            details = v.get("error") or ", ".join(
                f"{k}={val}" for k, val in v["parameters"].items()
            )
            table.add_row(*_cells(
                v["name"],
                v["version"],
                v["backend"],
                v["task"] or "",
                v["state"] or "",
                f"{v['progress']:.0f}%",
                details,
            ))
        out.print(table)
        return
    host = _plugins()
    try:
        settings, _ = _settings(config, host)
        specs = resolve_models(settings, host.backends, unavailable=host.unavailable())
    except ModelyardError as exc:
        _fail(exc.detail)
    table = Table("model", "version", "backend", "task", "active", "source")
    for s in specs:
        table.add_row(*_cells(
            s.name,
            s.version,
            s.backend.name,
            s.task.value if s.task else "(detect)",
            "yes" if s.active else "",
            s.source,
        ))
    out.print(table)


@models_cmd.command("export")
@click.argument("src_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--task",
    required=True,
    type=click.Choice(["embeddings", "classification", "text-generation", "tensor"]),
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--quantize", type=click.Choice(["int8"]), default=None, help="Dynamic int8 quantisation."
)
def export_cmd(src_dir: Path, task: str, out_dir: Path, quantize: str | None) -> None:
    """Export a Hugging Face model directory to ONNX with optimum and validate it."""
    try:
        from modelyard.backends.onnx.export import export_model
    except ImportError as exc:
        _fail(f"export needs the 'export' extra (pip install 'modelyard[export]'): {exc}")
    with Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        job = bar.add_task("export", total=100)
        try:
            report = export_model(
                src_dir,
                out_dir,
                task=task,
                quantize=quantize,
                progress=lambda phase, pct: bar.update(job, description=phase, completed=pct),
            )
        except ModelyardError as exc:
            _fail(exc.detail)
        bar.update(job, completed=100, description="done")
    out.print(
        f"exported to {out_dir} (max abs diff vs. source: {report.max_abs_diff:.3e})",
        markup=False,
    )


@cli.group("config")
def config_cmd() -> None:
    """Configuration tools."""


@config_cmd.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def config_check(file: str) -> None:
    """Validate FILE without starting anything; exit 1 with the problem on error."""
    host = _plugins()
    try:
        settings = _load_config(file, host)
        specs = resolve_models(settings, host.backends, unavailable=host.unavailable())
    except ConfigError as exc:
        click.echo(f"{file}: {exc.detail}", err=True)
        sys.exit(1)
    click.echo(f"{file}: ok ({len(specs)} model version(s))")


@cli.group("demo")
def demo_cmd() -> None:
    """The built-in demo models."""


@demo_cmd.command("prepare")
def demo_prepare() -> None:
    """Prepare the demo models now (serve does this on first run)."""
    host = _plugins()
    settings, _ = _settings(None, host)
    prepare_demo_models(settings, host)


cli.add_command(keys_cmd)
cli.add_command(pull_cmd)
cli.add_command(lock_cmd)
cli.add_command(batch_cmd)  # batch run INPUT.jsonl --out OUTPUT.jsonl
for _store_cmd in store_model_commands:  # models ls / rm NAME / verify [NAME]
    models_cmd.add_command(_store_cmd)
models_cmd.add_command(load_cmd)  # models load NAME --url URL [--follow]


def main() -> None:
    cli(prog_name="modelyard")
