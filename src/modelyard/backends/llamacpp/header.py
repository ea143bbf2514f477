"""A minimal GGUF header reader: validate a file before llama.cpp sees it.

``gguf.GGUFReader`` parses every tensor and token into numpy objects (17 s for Gemma 3 270M);
loading only needs the metadata scalars and the tensor table, which this reads in well under
a second. A file that is not GGUF, is truncated, or has an inconsistent header raises
``ModelLoadError`` with the reason, so the version fails instead of llama.cpp aborting.
"""

from __future__ import annotations

import mmap
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from modelyard.core.errors import ModelLoadError

__all__ = ["GGUFHeader", "read_header"]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Generous bounds that only a corrupt header exceeds; they keep a bad count from looping for hours.
_MAX_TENSORS = 1 << 20
_MAX_KV = 1 << 20

# GGUF value types -> struct format of a scalar.
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class GGUFHeader(msgspec.Struct, frozen=True, kw_only=True):
    """What the server needs to know about a GGUF file before (and besides) loading it."""

    path: str
    version: int
    architecture: str
    name: str
    tensor_count: int
    file_size: int
    #: ``{arch}.context_length``: the context the model was trained with (0 if absent).
    context_length: int
    #: ``Q4_K_M``, ``Q8_0``, ``F16``...: from ``general.file_type`` or the commonest tensor type.
    quantization: str
    chat_template: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool | None
    #: ``{arch}.pooling_type`` when present (embedding models declare it).
    pooling_type: int | None
    #: Every scalar metadata value (arrays such as the vocabulary are left out).
    metadata: dict[str, Any]

    @property
    def is_embedding_model(self) -> bool:
        return self.pooling_type is not None and self.pooling_type > 0


class _Cursor:
    """Bounds-checked little-endian reads; running off the end means a truncated file."""

    def __init__(self, data: mmap.mmap | bytes, size: int) -> None:
        self.data = data
        self.size = size
        self.pos = 0

    def take(self, n: int, what: str) -> int:
        start = self.pos
        if n < 0 or start + n > self.size:
            raise ModelLoadError(
                f"truncated GGUF file: {what} at byte {start} needs {n} bytes, "
                f"file has {self.size}"
            )
        self.pos = start + n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(fmt, self.data, start)[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        start = self.take(length, what)
        return bytes(self.data[start : start + length]).decode("utf-8", errors="replace")

    def skip_string(self, what: str) -> None:
        self.take(self.scalar("<Q", what), what)


def read_header(path: Path) -> GGUFHeader:
    """Read and check the header of ``path``; raise ``ModelLoadError`` naming what is wrong."""
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ModelLoadError(f"{path} is a directory with {len(found)} .gguf files; name one")
        path = found[0]
    try:
        with path.open("rb") as handle:
            size = path.stat().st_size
            if size < 8:
                raise ModelLoadError(f"{path.name} is not a GGUF file ({size} bytes)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _parse(path, _Cursor(data, size))
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(path: Path, cur: _Cursor) -> GGUFHeader:
    magic = bytes(cur.data[0:4])
    if magic != _MAGIC:
        raise ModelLoadError(f"{path.name} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    cur.pos = 4
    version = cur.scalar("<I", "version")
    if version not in _SUPPORTED_VERSIONS:
        raise ModelLoadError(f"{path.name}: unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = cur.scalar("<Q", "tensor count")
    kv_count = cur.scalar("<Q", "metadata count")
    if tensor_count > _MAX_TENSORS or kv_count > _MAX_KV:
        raise ModelLoadError(
            f"{path.name}: corrupt GGUF header ({tensor_count} tensors, {kv_count} metadata keys)"
        )
    metadata = _read_metadata(cur, kv_count)
    tensor_types, data_end = _read_tensor_table(cur, tensor_count, metadata)
    if data_end > cur.size:
        raise ModelLoadError(
            f"truncated GGUF file {path.name}: tensor data ends at byte {data_end}, "
            f"file has {cur.size}"
        )
    return _header(path, version, tensor_count, cur.size, metadata, tensor_types)


def _read_metadata(cur: _Cursor, count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for index in range(count):
        key = cur.string(f"metadata key #{index}")
        value_type = cur.scalar("<I", f"type of {key!r}")
        value = _read_value(cur, value_type, key)
        if value is not None:
            metadata[key] = value
    return metadata


def _read_value(cur: _Cursor, value_type: int, key: str) -> Any:
    """A scalar or string; arrays are skipped (returns None), they are vocabulary-sized."""
    if value_type in _SCALARS:
        return cur.scalar(_SCALARS[value_type], f"value of {key!r}")
    if value_type == _STRING:
        return cur.string(f"value of {key!r}")
    if value_type == _ARRAY:
        item_type = cur.scalar("<I", f"item type of {key!r}")
        count = cur.scalar("<Q", f"length of {key!r}")
        if item_type in _SCALARS:
            cur.take(count * struct.calcsize(_SCALARS[item_type]), f"items of {key!r}")
        elif item_type == _STRING:
            for _ in range(count):
                cur.skip_string(f"items of {key!r}")
        elif item_type == _ARRAY:
            for _ in range(count):
                _read_value(cur, _ARRAY, key)
        else:
            raise ModelLoadError(f"corrupt GGUF metadata: {key!r} has item type {item_type}")
        return None
    raise ModelLoadError(f"corrupt GGUF metadata: {key!r} has value type {value_type}")


def _read_tensor_table(
    cur: _Cursor, count: int, metadata: dict[str, Any]
) -> tuple[Counter[int], int]:
    """Tensor types by count, and the byte where the last tensor's data ends."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    types: Counter[int] = Counter()
    extent = 0
    for index in range(count):
        name = cur.string(f"name of tensor #{index}")
        n_dims = cur.scalar("<I", f"rank of {name!r}")
        if n_dims > 8:
            raise ModelLoadError(f"corrupt GGUF tensor table: {name!r} has {n_dims} dimensions")
        elements = 1
        for axis in range(n_dims):
            elements *= cur.scalar("<Q", f"dimension {axis} of {name!r}")
        ggml_type = cur.scalar("<I", f"type of {name!r}")
        offset = cur.scalar("<Q", f"offset of {name!r}")
        types[ggml_type] += 1
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            # A type newer than the installed gguf package: llama.cpp will judge it.
            extent = max(extent, offset)
            continue
        extent = max(extent, offset + elements // block * type_size)
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT)) or _DEFAULT_ALIGNMENT
    data_start = -(-cur.pos // alignment) * alignment
    return types, data_start + extent


def _header(
    path: Path,
    version: int,
    tensor_count: int,
    size: int,
    metadata: dict[str, Any],
    tensor_types: Counter[int],
) -> GGUFHeader:
    arch = str(metadata.get("general.architecture", ""))
    if not arch:
        raise ModelLoadError(f"{path.name}: GGUF metadata lacks general.architecture")

    def optional_int(key: str) -> int | None:
        value = metadata.get(key)
        return (
            int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        )

    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    template = metadata.get("tokenizer.chat_template")
    return GGUFHeader(
        path=str(path),
        version=version,
        architecture=arch,
        name=str(metadata.get("general.name", "")),
        tensor_count=tensor_count,
        file_size=size,
        context_length=optional_int(f"{arch}.context_length") or 0,
        quantization=_quantization(metadata, tensor_types),
        chat_template=template if isinstance(template, str) and template.strip() else None,
        bos_token_id=optional_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=optional_int("tokenizer.ggml.eos_token_id"),
        add_bos_token=add_bos if isinstance(add_bos, bool) else None,
        pooling_type=optional_int(f"{arch}.pooling_type"),
        metadata=metadata,
    )


def _quantization(metadata: dict[str, Any], tensor_types: Counter[int]) -> str:
    from gguf import GGMLQuantizationType, LlamaFileType

    file_type = metadata.get("general.file_type")
    if isinstance(file_type, int):
        try:
            return LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            return f"file_type {file_type}"
    if not tensor_types:
        return "unknown"
    commonest = tensor_types.most_common(1)[0][0]
    try:
        return GGMLQuantizationType(commonest).name
    except ValueError:
        return f"ggml type {commonest}"
