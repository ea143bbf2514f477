"""Open Inference Protocol v2 tensors: JSON and the binary tensor data extension."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from typing import Any

from modelyard.core.errors import BadRequestError
from modelyard.core.types import V2_DATATYPES, Tensor

__all__ = ["decode_binary_tensor", "encode_binary_tensor", "flatten", "validate_tensor"]

_STRUCT = {
    "BOOL": "?", "UINT8": "B", "UINT16": "H", "UINT32": "I", "UINT64": "Q",
    "INT8": "b", "INT16": "h", "INT32": "i", "INT64": "q",
    "FP16": "e", "FP32": "f", "FP64": "d",
}
_INTEGER = {"UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"}


def flatten(data: Any, name: str = "") -> list[Any]:
    """Row-major flattening of nested JSON lists (v2 allows both nested and flat data).

    Nested data must be regular: every list at one depth has the same length and every
    value sits at the same depth. ``[[1, [2]]]`` has two elements, like shape ``[1, 2]``, but
    no shape at all; it is refused (400), not read as ``[1, 2]``.
    """
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data  # flat: a nested value in it fails the element type check
    level: list[Any] = data
    while level and isinstance(level[0], list):
        width = len(level[0])
        if not all(isinstance(row, list) and len(row) == width for row in level):
            raise _ragged(name)
        level = [x for row in level for x in row]
    if any(isinstance(x, list) for x in level):
        raise _ragged(name)
    return level


def _ragged(name: str) -> BadRequestError:
    return BadRequestError(
        f"tensor {name!r}: nested data is ragged; every row at one depth must have the same "
        "length"
    )


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def validate_tensor(name: str, datatype: str, shape: Sequence[int], data: list[Any]) -> list[Any]:
    """Check datatype, shape and element types; return the data ready for a backend."""
    if datatype not in V2_DATATYPES:
        raise BadRequestError(f"tensor {name!r}: unknown datatype {datatype!r}")
    if any(d < 0 for d in shape):
        raise BadRequestError(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
    expected = element_count(shape)
    if len(data) != expected:
        raise BadRequestError(
            f"tensor {name!r}: shape {list(shape)} needs {expected} elements, got {len(data)}"
        )
    if datatype == "BYTES":
        return [_as_bytes(name, x) for x in data]
    if datatype == "BOOL":
        if not all(isinstance(x, bool) for x in data):
            raise BadRequestError(f"tensor {name!r}: BOOL data must be true/false")
        return data
    if datatype in _INTEGER:
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in data):
            raise BadRequestError(f"tensor {name!r}: {datatype} data must be integers")
        return data
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in data):
        raise BadRequestError(f"tensor {name!r}: {datatype} data must be numbers")
    return data


def _as_bytes(name: str, value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise BadRequestError(f"tensor {name!r}: BYTES data must be strings")


def decode_binary_tensor(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> list[Any]:
    """Decode one input of the binary extension (little-endian; BYTES length-prefixed)."""
    count = element_count(shape)
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            if offset + 4 > len(raw):
                raise BadRequestError(f"tensor {name!r}: truncated BYTES element")
            (length,) = struct.unpack_from("<I", raw, offset)
            offset += 4
            if offset + length > len(raw):
                raise BadRequestError(f"tensor {name!r}: truncated BYTES element")
            items.append(raw[offset: offset + length])
            offset += length
        if len(items) != count:
            raise BadRequestError(
                f"tensor {name!r}: shape {list(shape)} needs {count} elements, got {len(items)}"
            )
        return items
    code = _STRUCT.get(datatype)
    if code is None:
        raise BadRequestError(f"tensor {name!r}: unknown datatype {datatype!r}")
    size = struct.calcsize(code)
    if len(raw) != count * size:
        raise BadRequestError(
            f"tensor {name!r}: shape {list(shape)} of {datatype} needs {count * size} bytes, "
            f"got {len(raw)}"
        )
    return list(struct.unpack(f"<{count}{code}", raw))


def encode_binary_tensor(tensor: Tensor) -> bytes:
    data = tensor.data
    if tensor.datatype == "BYTES":
        parts = []
        for item in data:
            value = item if isinstance(item, bytes) else str(item).encode()
            parts.append(struct.pack("<I", len(value)) + value)
        return b"".join(parts)
    tobytes = getattr(data, "tobytes", None)
    if tobytes is not None:  # a numpy array from a backend: already packed
        return bytes(tobytes())
    code = _STRUCT[tensor.datatype]
    try:
        return struct.pack(f"<{len(data)}{code}", *data)
    except OverflowError:
        if code not in ("e", "f"):
            raise
        # A float past FP16/FP32's range is infinite there, as a cast (numpy's) makes it.
        return b"".join(_pack_float(code, x) for x in data)


def _pack_float(code: str, value: float) -> bytes:
    try:
        return struct.pack(f"<{code}", value)
    except OverflowError:
        return struct.pack(f"<{code}", math.copysign(math.inf, value))


def json_data(tensor: Tensor) -> list[Any]:
    """Output data for a JSON response (BYTES as text where it decodes, else base64)."""
    data = tensor.data
    if hasattr(data, "tolist"):
        data = data.tolist()
    if tensor.datatype == "BYTES":
        out = []
        for item in data:
            if isinstance(item, bytes):
                try:
                    out.append(item.decode())
                except UnicodeDecodeError:
                    out.append(base64.b64encode(item).decode())
            else:
                out.append(item)
        return out
    return list(data)
