"""The console's templates and static files, read from the installed package (the wheel)."""

from __future__ import annotations

import hashlib
import mimetypes
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any

import jinja2

__all__ = ["Assets", "StaticFile"]

_PACKAGE = "modelyard.api.ui"
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".md": "text/plain",
    ".txt": "text/plain",
}


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    media_type: str
    etag: str


def _walk(folder: Traversable, prefix: str = "") -> dict[str, StaticFile]:
    found: dict[str, StaticFile] = {}
    for entry in folder.iterdir():
        name = f"{prefix}/{entry.name}"
        if entry.is_dir():
            found.update(_walk(entry, name))
            continue
        body = entry.read_bytes()
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        media_type = _TYPES.get(suffix) or mimetypes.guess_type(entry.name)[0]
        found[name] = StaticFile(
            body, media_type or "application/octet-stream",
            '"' + hashlib.sha256(body).hexdigest()[:20] + '"',
        )
    return found


class Assets:
    """Templates rendered with autoescaping; static files held in memory, looked up by path
    (only files shipped in the package can be served: no path is joined from the URL)."""

    def __init__(self) -> None:
        self._env = jinja2.Environment(
            loader=jinja2.PackageLoader(_PACKAGE, "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self._static = _walk(files(_PACKAGE) / "static")

    def render(self, template: str, **context: Any) -> str:
        return self._env.get_template(template).render(**context)

    def static(self, path: str) -> StaticFile | None:
        """The file at ``/path`` under ``static/``, or None."""
        return self._static.get(path if path.startswith("/") else "/" + path)

    @property
    def static_paths(self) -> list[str]:
        return sorted(self._static)
