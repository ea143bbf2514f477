"""``modelyard batch run``: an OpenAI Batch input file run offline against a config.

The peer of vLLM's ``run_batch``. It uses the server's engine, not a copy of it: the input
file is checked as ``POST /v1/batches`` checks it (``parse_input`` with the same line
check), and each line runs through ``api.batches.line_executor``, the translation the live
endpoints use, so an output line's ``response.body`` is what a live call would answer.

Exit status: 0 when every line answered 200, 2 when the run finished but some lines failed
(their lines are in the errors file, or in OUTPUT without ``--errors``), 1 when nothing ran
(a bad config or input file, named by its line).
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from modelyard.core.errors import ModelNotFoundError, ModelyardError
from modelyard.core.jobs import ENDPOINTS, InputLine, LineExecutor, LineResult, known_model
from modelyard.core.jobs.inputs import parse_input
from modelyard.core.jobs.settings import BatchSettings
from modelyard.core.settings import Settings

if TYPE_CHECKING:  # the HTTP layer loads only when a batch runs, not for every command
    from modelyard.core.service import InferenceService

__all__ = ["batch_cmd", "run_lines"]

console = Console(stderr=True)

#: A line's answer was worth another try (the server was busy or failed).
_FAILED = LineResult(status_code=500, body={"error": {
    "message": "the line failed; the log has the detail", "type": "internal", "code": 500}})


def _fail(message: str) -> None:
    console.print(Text.assemble(("error:", "red"), " ", message), highlight=False)
    sys.exit(1)


def _endpoint_of(data: bytes) -> str:
    """The ``url`` of the file's first request (``parse_input`` then holds every line to it)."""
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            first = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return "/v1/chat/completions"  # parse_input names the line
        url = first.get("url") if isinstance(first, dict) else None
        if isinstance(url, str) and url not in ENDPOINTS:
            raise click.ClickException(
                f"input file line {number}: url {url!r} is not one of {', '.join(ENDPOINTS)}")
        return url if isinstance(url, str) else "/v1/chat/completions"
    return "/v1/chat/completions"


def check_input(data: bytes, settings: Settings, service: InferenceService) -> tuple[
        str, list[InputLine]]:
    """The file's endpoint and lines, checked as ``POST /v1/batches`` checks them."""
    from modelyard.api.batches import check_body

    endpoint = _endpoint_of(data)
    known = known_model(service.resolve)
    check_line = check_body(settings)

    def check(line: InputLine) -> None:
        if not known(line.model):
            raise ModelNotFoundError(f"unknown model {line.model!r}")
        check_line(endpoint, line)

    return endpoint, parse_input(data, endpoint, settings.batches, check)


async def _attempts(
    execute: LineExecutor, endpoint: str, line: InputLine, settings: BatchSettings,
) -> LineResult:
    """The line's answer, tried again while it is a 5xx or 429, ``max_attempts`` in all."""
    attempt = 1
    while True:
        try:
            result = await execute(endpoint, line.body, "")
        except Exception:  # noqa: BLE001 - the executor should not raise; count a failure
            console.print(Text(f"line {line.custom_id!r} failed"), highlight=False)
            result = _FAILED
        if not result.retryable or attempt >= settings.max_attempts:
            return result
        await asyncio.sleep(settings.retry_backoff_s * attempt)
        attempt += 1


async def run_lines(
    execute: LineExecutor, endpoint: str, lines: list[InputLine], settings: BatchSettings,
    *, concurrency: int, advance: Callable[[bool], None] = lambda ok: None,
) -> list[dict[str, Any]]:
    """One output record per line, in input order, at most ``concurrency`` lines at once."""
    slots = asyncio.Semaphore(concurrency)
    records: list[dict[str, Any]] = [{} for _ in lines]

    async def one(index: int, line: InputLine) -> None:
        async with slots:
            result = await _attempts(execute, endpoint, line, settings)
        records[index] = {
            "id": "batch_req_" + uuid.uuid4().hex,
            "custom_id": line.custom_id,
            "response": {"status_code": result.status_code, "request_id": result.request_id,
                         "body": result.body},
            "error": None,
        }
        advance(result.status_code == 200)

    async with asyncio.TaskGroup() as group:
        for index, line in enumerate(lines):
            group.create_task(one(index, line))
    return records


async def _run(
    settings: Settings, service: InferenceService, data: bytes, concurrency: int,
    show_progress: bool,
) -> tuple[list[dict[str, Any]], int]:
    from modelyard.api.batches import line_executor

    await service.start()  # models load in the background; their names resolve from here
    try:
        try:
            endpoint, lines = check_input(data, settings, service)
        except ModelyardError as exc:
            raise click.ClickException(exc.detail) from None
        await service.wait_until_loaded()
        failed = 0
        with Progress(
            TextColumn("[bold]batch"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, disable=not show_progress,
        ) as progress:
            task = progress.add_task("batch", total=len(lines), failed=0)

            def advance(ok: bool) -> None:
                nonlocal failed
                failed += 0 if ok else 1
                progress.update(task, advance=1, failed=failed)

            records = await run_lines(line_executor(service), endpoint, lines,
                                      settings.batches, concurrency=concurrency,
                                      advance=advance)
        return records, failed
    finally:
        await service.stop()
        await service.telemetry.aclose()


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("wb") as handle:
        for record in records:
            handle.write(msgspec.json.encode(record) + b"\n")


@click.group("batch")
def batch_cmd() -> None:
    """Run OpenAI Batch files offline."""


@batch_cmd.command("run")
@click.argument("input_file", metavar="INPUT.jsonl",
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_file", required=True, metavar="OUTPUT.jsonl",
              type=click.Path(dir_okay=False, path_type=Path), help="Where answers go.")
@click.option("--config", "-c", type=click.Path(dir_okay=False),
              help="TOML config file (default: $MODELYARD_CONFIG, else the demo models).")
@click.option("--errors", "errors_file", metavar="ERRORS.jsonl",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Failed lines go here (default: into OUTPUT, in input order).")
@click.option("--concurrency", type=click.IntRange(min=1), default=8, show_default=True,
              help="Lines in flight at once.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def batch_run(
    input_file: Path, out_file: Path, config: str | None, errors_file: Path | None,
    concurrency: int, no_progress: bool,
) -> None:
    """Run every request of INPUT.jsonl against CONFIG's models; answers go to OUTPUT.jsonl.

    Exit 0 when every line answered 200, 2 when some failed, 1 when the input is refused.
    """
    from modelyard.cli import _plugins, _settings
    from modelyard.core.service import InferenceService

    plugins = _plugins()
    try:
        settings, _ = _settings(config, plugins)
        service = InferenceService(settings, plugins)
    except ModelyardError as exc:
        _fail(exc.detail)
    data = input_file.read_bytes()
    records, failed = asyncio.run(_run(settings, service, data, concurrency, not no_progress))
    if errors_file is None:
        _write(out_file, records)
    else:
        ok = [r for r in records if r["response"]["status_code"] == 200]
        _write(out_file, ok)
        _write(errors_file, [r for r in records if r["response"]["status_code"] != 200])
    summary = f"{len(records)} lines: {len(records) - failed} ok, {failed} failed -> {out_file}"
    if errors_file is not None:
        summary += f" (errors: {errors_file})"
    console.print(Text(summary), highlight=False)
    if failed:
        sys.exit(2)
