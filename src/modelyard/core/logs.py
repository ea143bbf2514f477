"""Logs: JSON lines (or text for a terminal), a request id on every line, never a secret.

The request being served is a :class:`RequestInfo` held in a context variable: the HTTP layer
sets it, the core fills in the model, version and tokens as they become known, and every log
line emitted while serving it carries its id. A context variable is the one piece of
module-level machinery here: it holds no state of its own, only a per-task view, which is how
asyncio lets code deep in the call stack see the request it serves without threading it
through every signature.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import sys
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import IO, Any, Literal

import msgspec

__all__ = [
    "ACCESS_LOGGER",
    "JsonFormatter",
    "LogFormat",
    "RequestContextFilter",
    "RequestInfo",
    "TextFormatter",
    "bind_request",
    "configure_logging",
    "current_request",
    "new_request_id",
    "redact",
    "release_request",
    "sane_request_id",
]

LogFormat = Literal["json", "text"]
ACCESS_LOGGER = "modelyard.access"

#: An incoming X-Request-Id is kept only if it looks like an id, never a payload.
_SANE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,127}$")

_REQUEST: ContextVar[RequestInfo | None] = ContextVar("modelyard_request", default=None)


@dataclass(slots=True)
class RequestInfo:
    """What the access line, the request span and the request metrics say about a request."""

    request_id: str
    method: str = ""
    path: str = ""
    model: str = ""
    version: str = ""
    backend: str = ""
    #: ``hit``, ``miss`` or ``""`` when the cache was not asked.
    cache: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: The prompt text, filled in only when ``log_prompts`` is on.
    prompt: str | None = None

    def add_tokens(self, prompt: int | None, completion: int | None) -> None:
        """Several results (a list of prompts, a failover) add up."""
        if prompt is not None:
            self.prompt_tokens = (self.prompt_tokens or 0) + prompt
        if completion is not None:
            self.completion_tokens = (self.completion_tokens or 0) + completion


def current_request() -> RequestInfo | None:
    """The request this task serves, or None outside a request (startup, background loads)."""
    return _REQUEST.get()


def bind_request(info: RequestInfo) -> Token[RequestInfo | None]:
    """Make ``info`` the current request; tasks created from here on share the same object."""
    return _REQUEST.set(info)


def release_request(token: Token[RequestInfo | None]) -> None:
    _REQUEST.reset(token)


def new_request_id() -> str:
    """32 random hex digits (a uuid4's worth of randomness, a tenth of its cost)."""
    return os.urandom(16).hex()


def sane_request_id(incoming: str | None) -> str:
    """The caller's X-Request-Id if it is a plain token of at most 128 chars, else a new one."""
    if incoming and _SANE_ID.match(incoming):
        return incoming
    return new_request_id()


# -- redaction -------------------------------------------------------------------------------

# Defence in depth: nothing here logs headers or request bodies, but a message built from
# client input (an error echoing a header, a library's exception text) must not carry a
# credential into the log either.
_SECRET_PATTERNS = (
    # ``Authorization: Bearer x``, ``api_key=x``, ``"password": "x"``: keep the name.
    (re.compile(
        r"(?i)(\b(?:authorization|proxy-authorization|x-api-key|api[_-]?key|password|secret|token)"
        r"\b[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic)\s+)?[^\s\"',;&]+"
    ), r"\1<redacted>"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9\-._~+/]{8,}=*"), r"\1 <redacted>"),
    (re.compile(r"\b(my_[0-9a-f]+_)[A-Za-z0-9_-]{8,}"), r"\1<redacted>"),  # modelyard API keys
    (re.compile(r"\beyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), "<jwt>"),
)


def redact(text: str) -> str:
    """Replace anything shaped like a credential (header value, API key, JWT) with a marker."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


# -- formatters --------------------------------------------------------------------------------

#: Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName", "request_id", "trace_id", "span_id"}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_FIELDS}


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, bool | int | float) or value is None:
        return value
    return redact(str(value))


class RequestContextFilter(logging.Filter):
    """Stamps each record with the current request id and trace ids, where there are some."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = _REQUEST.get()
        if not hasattr(record, "request_id"):
            record.request_id = info.request_id if info is not None else None
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = _trace_ids()
        return True


def _trace_ids() -> tuple[str | None, str | None]:
    # Imported lazily and guarded: logging must work in a process that never loads tracing.
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None, None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None, None
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, ids, and every ``extra`` field."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key in ("request_id", "trace_id", "span_id"):
            value = getattr(record, key, None)
            if value:
                line[key] = value
        for key, value in _extras(record).items():
            line[key] = _clean(value)
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            line["stack"] = redact(self.formatStack(record.stack_info))
        return msgspec.json.encode(line).decode()


class TextFormatter(logging.Formatter):
    """``time level logger [request id] message key=value ...`` for a human at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        setattr(record, "rid", f" [{rid}]" if rid else "")  # noqa: B010 - not a declared field
        try:
            text = super().format(record)
        finally:
            delattr(record, "rid")
        fields = " ".join(
            f"{k}={_clean(v)}"
            for k, v in _extras(record).items()
            if k != "rid" and v not in (None, "")
        )
        return redact(f"{text} {fields}" if fields else text)


def configure_logging(
    level: str = "info", fmt: LogFormat = "json", *, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every logger (uvicorn's included) to one handler on the root logger.

    Replaces the handler a previous call installed, so tests and a restarted server do not
    log each line twice.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(RequestContextFilter())
    handler.set_name("modelyard")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "modelyard"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
