"""Cache keys: a keyed blake3 over a canonical, length-prefixed encoding of everything that
decides an answer, and the server secret that keys it."""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import msgspec
from blake3 import blake3

from modelyard.core.types import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationParams,
    InferenceRequest,
    TensorRequest,
)

__all__ = [
    "SECRET_FILE",
    "KeyFields",
    "cache_key",
    "derive_secrets",
    "encode_fields",
    "is_cacheable",
    "load_or_create_secret",
    "request_fields",
    "weights_digest",
]

log = logging.getLogger(__name__)

#: Bumping this retires every stored entry at once (a change in what a key covers).
KEY_SCHEMA = b"modelyard/response-cache/key/1"
SECRET_FILE = "secret"
_SECRET_BYTES = 32
_LENGTH_BYTES = 8


class KeyFields(msgspec.Struct, frozen=True, kw_only=True):
    """Everything that decides an answer; two requests share an entry only if all are equal."""

    model: str
    version: str
    #: Digest of the weight files, so replacing a model in place never serves old answers.
    weights_digest: str
    backend: str
    backend_version: str
    #: The caller's tenant: two tenants never see each other's entries.
    tenant: str
    #: Changed by a purge of this model (see ``CacheLayer.purge``).
    generation: str
    task: str
    params: bytes
    input: bytes


def encode_fields(fields: KeyFields) -> bytes:
    """Length-prefix every field so ``("ab", "c")`` and ``("a", "bc")`` never encode alike."""
    parts = [KEY_SCHEMA]
    for name in fields.__struct_fields__:
        value = getattr(fields, name)
        raw = value if isinstance(value, bytes) else value.encode()
        parts.append(len(raw).to_bytes(_LENGTH_BYTES, "big"))
        parts.append(raw)
    return b"".join(parts)


def cache_key(key_secret: bytes, fields: KeyFields) -> bytes:
    """The 32-byte key under which an answer is stored."""
    return blake3(encode_fields(fields), key=key_secret).digest()


# -- requests ------------------------------------------------------------------------------


def is_cacheable(request: InferenceRequest) -> bool:
    """Only deterministic requests are cached: generation must be greedy or seeded."""
    if isinstance(request, ChatRequest | CompletionRequest):
        return request.params.deterministic
    return True


def _enc_hook(value: Any) -> Any:
    # Backends may hand numpy arrays around; their list form encodes the same values.
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    raise NotImplementedError(f"cannot encode {type(value).__name__} in a cache key")


def _encoder() -> msgspec.msgpack.Encoder:
    # "deterministic" sorts dict keys, so parameter maps in any order give one key.
    return msgspec.msgpack.Encoder(order="deterministic", enc_hook=_enc_hook)


def _normalised_params(params: GenerationParams) -> dict[str, Any]:
    # Stop strings act as a set, logit biases as a map; -0.0 and 0.0 are one temperature.
    fields = msgspec.structs.asdict(params)
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        fields[name] = float(fields[name]) + 0.0
    fields["stop"] = sorted(set(params.stop))
    if params.logit_bias is not None:
        fields["logit_bias"] = sorted(
            (int(k), float(v) + 0.0) for k, v in params.logit_bias.items()
        )
    return fields


def request_fields(request: InferenceRequest) -> tuple[str, bytes, bytes]:
    """The task, the canonical parameters and the canonical input of a request."""
    enc = _encoder()
    if isinstance(request, ChatRequest):
        messages = [(m.role, m.content) for m in request.messages]
        return (
            request.task.value,
            enc.encode(_normalised_params(request.params)),
            enc.encode(messages),
        )
    if isinstance(request, CompletionRequest):
        return (
            request.task.value,
            enc.encode(_normalised_params(request.params)),
            enc.encode(request.prompt),
        )
    if isinstance(request, EmbeddingRequest):
        return request.task.value, enc.encode(None), enc.encode(request.inputs)
    if isinstance(request, ClassificationRequest):
        return request.task.value, enc.encode({"top_k": request.top_k}), enc.encode(request.inputs)
    if isinstance(request, TensorRequest):
        tensors = [(t.name, t.datatype, t.shape, t.data, t.parameters) for t in request.inputs]
        return request.task.value, enc.encode({"outputs": request.outputs}), enc.encode(tensors)
    raise TypeError(f"no cache key for {type(request).__name__}")


# -- secrets and digests -------------------------------------------------------------------


def derive_secrets(secret: bytes | str) -> tuple[bytes, bytes]:
    """Two independent 32-byte keys from one server secret: one for keys, one for MACs."""
    material = secret.encode() if isinstance(secret, str) else secret
    if not material:
        raise ValueError("the cache secret must not be empty")
    key_secret = blake3(material, derive_key_context="modelyard response cache key v1").digest()
    mac_secret = blake3(material, derive_key_context="modelyard response cache mac v1").digest()
    return key_secret, mac_secret


def load_or_create_secret(directory: Path) -> bytes:
    """Read ``directory/secret``, creating it (random, mode 0600) on first use."""
    path = directory / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_secret(path)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_bytes(_SECRET_BYTES))
    # O_CREAT's mode is filtered by the umask; a secret must be 0600 whatever the umask is.
    os.chmod(path, 0o600)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("cache secret %s had mode %o; tightening to 0600", path, mode)
        os.chmod(path, 0o600)
    data = path.read_bytes()
    if len(data) < 16:
        raise ValueError(f"cache secret {path} is too short ({len(data)} bytes); delete it")
    return data


def weights_digest(path: Path, *, content: bool = False) -> str:
    """A digest of the weight files under ``path``, so a model replaced in place gets new keys.

    By default each file counts by name, size, inode and mtime (what rsync's quick check
    trusts): milliseconds even for multi-GB weights. ``content=True`` hashes the bytes too
    (blake3, multithreaded). Hidden entries (``.git``, ``.venv``, ...) are skipped. Run it
    off the event loop.
    """
    hasher = blake3(max_threads=blake3.AUTO)
    for file, name in _weight_files(path):
        st = file.stat()
        for part in (name.encode(), str((st.st_size, st.st_ino, st.st_mtime_ns)).encode()):
            hasher.update(len(part).to_bytes(_LENGTH_BYTES, "big") + part)
        if content and st.st_size:  # mmap refuses empty files
            hasher.update_mmap(file)
    return hasher.hexdigest()


def _weight_files(path: Path) -> list[tuple[Path, str]]:
    if path.is_file():
        return [(path, path.name)]
    found: list[tuple[Path, str]] = []
    pending = [path]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif entry.is_file():
                    file = Path(entry.path)
                    found.append((file, file.relative_to(path).as_posix()))
    return sorted(found, key=lambda item: item[1])
