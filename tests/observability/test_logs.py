"""JSON and text log lines: request ids, extra fields, and no credential ever."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from modelyard.core.logs import (
    JsonFormatter,
    RequestContextFilter,
    RequestInfo,
    TextFormatter,
    bind_request,
    configure_logging,
    redact,
    release_request,
    sane_request_id,
)

KEY = "my_0123456789abcdef_" + "S" * 43
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A private logger writing JSON lines through the request filter into a buffer."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestContextFilter())
    logger = logging.getLogger("modelyard.tests.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_json_line_has_time_level_logger_message_and_extra_fields(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.info("model %s loaded", "m", extra={"model": "m", "version": "2", "seconds": 1.5})
    (line,) = _lines(stream)
    assert line["level"] == "info"
    assert line["logger"] == "modelyard.tests.logs"
    assert line["message"] == "model m loaded"
    assert line["model"] == "m" and line["version"] == "2" and line["seconds"] == 1.5
    assert str(line["time"]).endswith("Z")
    assert "request_id" not in line  # outside a request


def test_lines_inside_a_request_carry_its_id(capture: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = capture
    token = bind_request(RequestInfo("req-42"))
    try:
        logger.warning("inside")
    finally:
        release_request(token)
    logger.warning("outside")
    inside, outside = _lines(stream)
    assert inside["request_id"] == "req-42"
    assert "request_id" not in outside


def test_an_exception_is_one_field_of_the_same_line(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    try:
        raise ValueError(f"bad header Authorization: Bearer {KEY}")
    except ValueError:
        logger.exception("failed")
    (line,) = _lines(stream)
    assert "ValueError" in str(line["exception"])
    assert KEY not in stream.getvalue()


@pytest.mark.parametrize(
    "text",
    [
        f"Authorization: Bearer {KEY}",
        f"authorization={KEY}",
        f"'Authorization': 'Bearer {KEY}'",
        f"header was Bearer {JWT}",
        f"api_key={KEY}&model=x",
        f"x-api-key: {KEY}",
        f"key {KEY} rejected",
        f"token {JWT}",
        "Authorization: Basic dXNlcjpwYXNzd29yZA==",
    ],
)
def test_credentials_are_redacted(text: str) -> None:
    cleaned = redact(text)
    for secret in (KEY[20:], "eyJzdWIiOiJ4In0", "dXNlcjpwYXNzd29yZA"):
        assert secret not in cleaned, cleaned
    assert "redacted" in cleaned or "<jwt>" in cleaned


def test_redaction_leaves_ordinary_text_alone() -> None:
    text = "POST /v1/chat/completions 200 12.5ms prompt_tokens=5 completion_tokens=7"
    assert redact(text) == text


def test_secrets_in_extra_fields_are_redacted_too(
    capture: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = capture
    logger.info("auth failed", extra={"detail": f"Bearer {KEY}"})
    assert KEY[20:] not in stream.getvalue()


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("req:2024-01-01T00:00:00Z/7", True),
        ("", False),
        (None, False),
        ("x" * 129, False),
        ("has space", False),
        ("new\nline", False),
        ('"quoted"', False),
        ("<script>", False),
    ],
)
def test_an_incoming_request_id_is_kept_only_when_sane(incoming: str | None, kept: bool) -> None:
    result = sane_request_id(incoming)
    assert (result == incoming) is kept
    assert 1 <= len(result) <= 128


def test_text_format_reads_well_and_keeps_fields() -> None:
    record = logging.LogRecord("modelyard.access", logging.INFO, __file__, 1, "GET / %d", (200,),
                               None)
    record.request_id = "r1"
    record.model = "m"
    text = TextFormatter().format(record)
    assert " INFO modelyard.access [r1]: GET / 200 model=m" in text


def test_configure_logging_replaces_its_own_handler() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    try:
        first = configure_logging("info", "json", stream=io.StringIO())
        stream = io.StringIO()
        second = configure_logging("debug", "text", stream=stream)
        ours = [h for h in root.handlers if h.get_name() == "modelyard"]
        assert ours == [second] and first not in root.handlers
        logging.getLogger("modelyard.tests.configure").debug("hello %s", "there")
        assert "DEBUG modelyard.tests.configure: hello there" in stream.getvalue()
    finally:
        for h in list(root.handlers):
            if h not in before:
                root.removeHandler(h)
        root.setLevel(level)
