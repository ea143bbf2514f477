"""Checks on an ONNX file before onnxruntime sees it, without needing the ``onnx`` package.

The file is walked as raw protobuf: only the fields that can point outside the model
(external data locations) or that describe the graph's interface are read. Custom-op
libraries are never loaded: nothing here or in the backend calls
``SessionOptions.register_custom_ops_library``, whatever a model file says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from modelyard.core.errors import ModelLoadError

__all__ = ["GraphSummary", "check_model_file", "summarize"]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


class _Malformed(Exception):
    pass


@dataclass
class GraphSummary:
    """What the backend needs to know about a model file before opening a session."""

    ir_version: int = 0
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    external_locations: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message; LEN values stay unparsed views."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise _Malformed("field number 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _Malformed("length-delimited field runs past the end")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
            if pos > len(buf):
                raise _Malformed("fixed-width field runs past the end")
        else:
            raise _Malformed(f"unsupported wire type {wire}")


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise _Malformed("expected a string")
    try:
        return bytes(value).decode()
    except UnicodeDecodeError:
        raise _Malformed("invalid UTF-8 in a string field") from None


def _view(value: int | memoryview) -> memoryview:
    if not isinstance(value, memoryview):
        raise _Malformed("expected an embedded message")
    return value


class _Walker:
    def __init__(self, summary: GraphSummary) -> None:
        self.summary = summary

    def model(self, buf: memoryview) -> None:
        has_graph = False
        for number, _, value in _fields(buf):
            if number == 1 and isinstance(value, int):
                self.summary.ir_version = value
            elif number == 7:
                has_graph = True
                self.graph(_view(value), top=True)
            elif number == 20:  # training_info: initialization and algorithm graphs
                for sub, _, inner in _fields(_view(value)):
                    if sub in (1, 2):
                        self.graph(_view(inner))
            elif number == 25:  # functions
                for sub, _, inner in _fields(_view(value)):
                    if sub == 7:
                        self.node(_view(inner))
        if not has_graph or self.summary.ir_version <= 0:
            raise _Malformed("no graph or IR version")

    def graph(self, buf: memoryview, *, top: bool = False) -> None:
        for number, _, value in _fields(buf):
            if number == 1:
                self.node(_view(value))
            elif number == 5:
                self.tensor(_view(value))
            elif number == 15:  # sparse_initializer: values and indices tensors
                self.sparse(_view(value))
            elif top and number in (11, 12):
                names = self.summary.inputs if number == 11 else self.summary.outputs
                names.extend(_text(v) for n, _, v in _fields(_view(value)) if n == 1)

    def node(self, buf: memoryview) -> None:
        for number, _, value in _fields(buf):
            if number == 5:
                self.attribute(_view(value))
            elif number == 7:
                self.summary.domains.add(_text(value))

    def attribute(self, buf: memoryview) -> None:
        for number, _, value in _fields(buf):
            if number in (5, 10):
                self.tensor(_view(value))
            elif number in (6, 11):
                self.graph(_view(value))
            elif number in (22, 23):
                self.sparse(_view(value))

    def sparse(self, buf: memoryview) -> None:
        for number, _, value in _fields(buf):
            if number in (1, 2):
                self.tensor(_view(value))

    def tensor(self, buf: memoryview) -> None:
        external = False
        location = None
        for number, _, value in _fields(buf):
            if number == 14 and value == _EXTERNAL:
                external = True
            elif number == 13:
                entry = {n: _text(v) for n, _, v in _fields(_view(value)) if n in (1, 2)}
                if entry.get(1) == "location":
                    location = entry.get(2, "")
        if external or location is not None:
            self.summary.external_locations.add(location or "")


def summarize(path: Path) -> GraphSummary:
    """Parse ``path`` far enough to list its interface and external data.

    A file that is not ONNX protobuf raises ModelLoadError saying so.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path.name}: {exc.strerror or exc}") from None
    summary = GraphSummary()
    try:
        _Walker(summary).model(memoryview(data))
    except _Malformed as exc:
        raise ModelLoadError(f"{path.name} is not a valid ONNX model ({exc})") from None
    return summary


def _escapes(location: str) -> bool:
    if not location or "\x00" in location:
        return True
    if PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute():
        return True
    if PureWindowsPath(location).drive or location.startswith(("/", "\\")):
        return True
    parts = location.replace("\\", "/").split("/")
    return ".." in parts


def check_external_data(summary: GraphSummary, root: Path, model_name: str) -> None:
    """Refuse external data that is absolute, climbs with ``..`` or resolves outside ``root``."""
    base = root.resolve()
    for location in sorted(summary.external_locations):
        if _escapes(location) or not (base / location).resolve().is_relative_to(base):
            raise ModelLoadError(
                f"{model_name} refers to external data {location!r} outside the model "
                "directory; refusing to load it"
            )
        if not (base / location).is_file():
            raise ModelLoadError(f"{model_name}: external data file {location!r} is missing")


def check_model_file(path: Path) -> GraphSummary:
    """Summarise ``path`` and check its external data stays inside its directory."""
    summary = summarize(path)
    check_external_data(summary, path.parent, path.name)
    return summary
