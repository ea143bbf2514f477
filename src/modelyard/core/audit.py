"""The audit log: admin actions, key changes and auth failures as JSON lines, never a secret."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

__all__ = ["AuditEvent", "AuditLog", "redact"]

log = logging.getLogger("modelyard.audit")

# Defence in depth: callers never pass credentials, but a message built from user input
# (a bad Authorization header echoed in a reason) must not carry one into the file either.
_API_KEY = re.compile(r"\b(my_[0-9a-f]+_)[A-Za-z0-9_-]{8,}")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def redact(text: str) -> str:
    """Replace anything shaped like an API key secret or a JWT with a marker."""
    return _JWT.sub("<jwt>", _API_KEY.sub(r"\1<redacted>", text))


class AuditEvent(msgspec.Struct, kw_only=True):
    """One line of the audit log."""

    time: str
    principal: str
    action: str
    target: str
    result: str
    client: str
    status: int | None = None
    detail: str = ""


class AuditLog:
    """Appends one JSON object per line to ``path`` (and to the ``modelyard.audit`` logger).

    Each event is a single ``write`` on a file opened with ``O_APPEND``, so several server
    workers and the ``modelyard keys`` CLI can share one file, and a rotated file is
    recreated by the next event. The file is created 0600: it names principals and clients.
    """

    def __init__(self, path: str | Path | None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser() if path else None
        self._clock = clock

    def record(
        self,
        action: str,
        *,
        result: str,
        principal: str = "",
        target: str = "",
        client: str = "",
        status: int | None = None,
        detail: str = "",
    ) -> AuditEvent:
        when = dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC)
        event = AuditEvent(
            time=when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            principal=redact(principal), action=action, target=redact(target), result=result,
            client=client, status=status, detail=redact(detail),
        )
        line = msgspec.json.encode(event) + b"\n"
        log.info("%s", line[:-1].decode())
        if self.path is not None:
            _append(self.path, line)
        return event

    def read(self) -> list[AuditEvent]:
        """Every event in the file (tests and ``modelyard`` tooling)."""
        if self.path is None or not self.path.exists():
            return []
        decoder = msgspec.json.Decoder(AuditEvent)
        return [decoder.decode(raw) for raw in self.path.read_bytes().splitlines() if raw]


def _append(path: Path, line: bytes) -> None:
    # Small synchronous writes: audit events are rare next to requests, and an event
    # must be on disk before the response that it describes leaves.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
