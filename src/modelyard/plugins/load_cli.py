"""``modelyard models load NAME --url URL [--follow]``: load a model on a running server and
show its progress from the server's events (``GET /v1/events``, see docs/events.md)."""

from __future__ import annotations

import json
import threading
from typing import Any

import click
import httpx

__all__ = ["load_cmd"]

#: How long to keep reading events once the load request has answered.
_SETTLE_S = 0.5


def _ws_url(url: str) -> str:
    base = url.rstrip("/")
    return "ws" + base.removeprefix("http") if base.startswith("http") else base


def _line(event: dict[str, Any]) -> str | None:
    where = f"{event['model']}:{event['version']}"
    if event["kind"] == "load.progress":
        return f"{where} {event['percent']:5.1f}% {event['phase']}"
    if event["kind"] == "version.state":
        error = f" ({event['error']})" if event.get("error") else ""
        return f"{where} {event['new']}{error}"
    return None


@click.command("load")
@click.argument("name")
@click.option("--url", required=True, help="The server, e.g. http://127.0.0.1:8000.")
@click.option("--follow", is_flag=True, help="Show load progress from the server's events.")
@click.option("--key", envvar="MODELYARD_API_KEY", help="API key (default $MODELYARD_API_KEY).")
def load_cmd(name: str, url: str, follow: bool, key: str | None) -> None:
    """Load every version of NAME that is not serving (POST /v2/repository/models/NAME/load)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    load_url = f"{url.rstrip('/')}/v2/repository/models/{name}/load"
    if not follow:
        _report(_post(load_url, headers), name)
        return
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    events = f"{_ws_url(url)}/v1/events?models={name}&kinds=version.state,load.progress"
    try:
        with connect(events, additional_headers=headers or None, open_timeout=10) as ws:
            json.loads(ws.recv(timeout=10))  # "subscribed": events flow from here on
            answer: list[httpx.Response | str] = []
            post = threading.Thread(target=lambda: answer.append(_post(load_url, headers)))
            post.start()
            while True:
                try:
                    event = json.loads(ws.recv(timeout=_SETTLE_S))
                except TimeoutError:
                    if post.is_alive():
                        continue
                    break  # answered, and nothing more came within the settle time
                line = _line(event) if "kind" in event else None
                if line:
                    click.echo(line)
            post.join()
    except (OSError, WebSocketException) as exc:
        raise click.ClickException(f"cannot follow events at {events}: {exc}") from None
    _report(answer[0], name)


def _post(load_url: str, headers: dict[str, str]) -> httpx.Response | str:
    try:
        return httpx.post(load_url, headers=headers, timeout=None)
    except httpx.HTTPError as exc:
        return f"cannot reach the server: {exc}"


def _report(answer: httpx.Response | str, name: str) -> None:
    if isinstance(answer, str):
        raise click.ClickException(answer)
    if answer.status_code >= 400:
        try:
            detail = answer.json().get("detail", answer.text)
        except ValueError:
            detail = answer.text
        raise click.ClickException(f"loading {name} failed ({answer.status_code}): {detail}")
    click.echo(f"{name}: loaded")
