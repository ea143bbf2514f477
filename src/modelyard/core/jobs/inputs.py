"""Reading a batch input file: JSONL, one request per line, checked before a job starts."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from modelyard.core.errors import BadRequestError, ModelyardError
from modelyard.core.jobs.model import InputLine
from modelyard.core.jobs.settings import BatchSettings

__all__ = ["parse_input", "read_input"]

_decoder = msgspec.json.Decoder(InputLine)


def _refuse(number: int, problem: str) -> BadRequestError:
    return BadRequestError(f"input file line {number}: {problem}", extra={"line": number})


def parse_input(
    data: bytes, endpoint: str, settings: BatchSettings,
    check: Callable[[InputLine], None] = lambda line: None,
) -> list[InputLine]:
    """Every line of ``data``, or 400 naming the first bad one.

    A line is bad when it is not a JSON request object, is over ``max_line_bytes``, repeats
    a ``custom_id``, targets another endpoint than the batch's, or fails ``check`` (unknown
    model, a body the endpoint refuses, a request over the model's limits).
    """
    lines: list[InputLine] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > settings.max_line_bytes:
            raise _refuse(number, f"{len(raw)} bytes, over the limit of "
                                  f"{settings.max_line_bytes}")
        if len(lines) >= settings.max_lines:
            raise _refuse(number, f"the file has more than {settings.max_lines} requests")
        try:
            line = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise _refuse(number, f"not a JSON request object ({exc})") from None
        if line.custom_id in seen:
            raise _refuse(number, f"duplicate custom_id {line.custom_id!r}")
        seen.add(line.custom_id)
        if line.method.upper() != "POST":
            raise _refuse(number, f"method must be POST, not {line.method!r}")
        if line.url != endpoint:
            raise _refuse(number, f"url {line.url!r} is not the batch's endpoint {endpoint!r}")
        if not isinstance(line.body.get("model"), str):
            raise _refuse(number, "body must name a 'model'")
        try:
            check(line)
        except ModelyardError as exc:
            raise _refuse(number, exc.detail) from None
        lines.append(line)
    if not lines:
        raise BadRequestError("the input file holds no requests")
    return lines


def read_input(data: bytes) -> list[InputLine]:
    """The lines of an input file that was checked when its batch was created."""
    return [_decoder.decode(raw) for raw in data.splitlines() if raw.strip()]
