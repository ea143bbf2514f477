"""Result <-> bytes: a tagged msgspec envelope, MAC'd with the server secret. Never pickle."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from blake3 import blake3

from modelyard.core.types import (
    ClassificationResult,
    EmbeddingResult,
    GenerationResult,
    InferenceResult,
    TensorResult,
)

__all__ = ["CorruptValue", "ResultCodec"]

#: First byte of every stored value; a change of layout bumps it and old entries read as misses.
_FORMAT = b"\x01"
_MAC_BYTES = 32


class _Generation(msgspec.Struct, tag="generation", array_like=True):
    result: GenerationResult


class _Embedding(msgspec.Struct, tag="embedding", array_like=True):
    result: EmbeddingResult


class _Classification(msgspec.Struct, tag="classification", array_like=True):
    result: ClassificationResult


class _Tensor(msgspec.Struct, tag="tensor", array_like=True):
    result: TensorResult


_Envelope = _Generation | _Embedding | _Classification | _Tensor
_WRAP: dict[type[Any], type[Any]] = {
    GenerationResult: _Generation,
    EmbeddingResult: _Embedding,
    ClassificationResult: _Classification,
    TensorResult: _Tensor,
}


class CorruptValue(Exception):
    """A stored value that is not one this server wrote (bad MAC, layout or schema)."""


def _enc_hook(value: Any) -> Any:
    # Tensor outputs may be numpy arrays; the API renders their list form identically.
    tolist = getattr(value, "tolist", None)
    if tolist is not None:
        return tolist()
    raise NotImplementedError(f"cannot cache a {type(value).__name__}")


class ResultCodec:
    """Encodes results deterministically (equal results, equal bytes: dedup relies on it)."""

    def __init__(self, mac_secret: bytes) -> None:
        self._mac_secret = mac_secret
        self._encoder = msgspec.msgpack.Encoder(order="deterministic", enc_hook=_enc_hook)
        self._decoder = msgspec.msgpack.Decoder(_Envelope)

    def _mac(self, body: bytes) -> bytes:
        return blake3(body, key=self._mac_secret).digest()

    def encode(self, result: InferenceResult) -> bytes:
        wrap = _WRAP.get(type(result))
        if wrap is None:
            raise TypeError(f"cannot cache a {type(result).__name__}")
        body = self._encoder.encode(wrap(result))
        return _FORMAT + self._mac(body) + body

    def decode(self, value: bytes) -> InferenceResult:
        """The result; ``CorruptValue`` if the value was not written by a server with our secret."""
        head = len(_FORMAT) + _MAC_BYTES
        if len(value) <= head or value[:1] != _FORMAT:
            raise CorruptValue("unknown layout")
        mac, body = value[1:head], value[head:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise CorruptValue("MAC mismatch")
        try:
            envelope = self._decoder.decode(body)
        except msgspec.DecodeError as exc:
            raise CorruptValue(f"undecodable: {exc}") from None
        result: InferenceResult = envelope.result
        return result
