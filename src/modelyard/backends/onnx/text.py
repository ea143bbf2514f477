"""Tokenising a batch of texts into padded onnxruntime feeds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.backends.onnx.layout import ModelFiles
from modelyard.backends.onnx.tensor import numpy_dtype
from modelyard.core.errors import ModelLoadError

__all__ = ["Encoded", "TextEncoder", "load_tokenizer"]

_FILLED = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})


def load_tokenizer(files: ModelFiles) -> Any:
    """The ``tokenizers`` Tokenizer of a model directory; ModelLoadError when missing or broken."""
    from tokenizers import Tokenizer

    path = files.tokenizer_path
    if path is None:
        raise ModelLoadError(f"no tokenizer.json in {files.root}; text tasks need one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception subclasses
        raise ModelLoadError(f"tokenizer.json cannot be read: {exc}") from None


@dataclass
class Encoded:
    """A padded batch: feeds for session.run plus per-text accounting."""

    feeds: dict[str, npt.NDArray[Any]]
    attention_mask: npt.NDArray[np.int64]
    tokens: list[int]
    truncated: list[bool]


class TextEncoder:
    """Tokenises, truncates to ``max_length`` and pads to the longest text of the batch."""

    def __init__(self, files: ModelFiles, graph_inputs: dict[str, str], max_length: int) -> None:
        if "input_ids" not in graph_inputs:
            raise ModelLoadError(f"{files.model.name} has no input_ids input; not a text model")
        unknown = sorted(set(graph_inputs) - _FILLED)
        if unknown:
            raise ModelLoadError(
                f"{files.model.name} has inputs a tokenizer cannot fill: {', '.join(unknown)}"
            )
        self.max_length = max_length
        self._inputs = graph_inputs
        tokenizer = load_tokenizer(files)
        pad_token = files.special_token("pad_token")
        pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_id is None:
            pad_id = files.config.get("pad_token_id") or 0
            pad_token = tokenizer.id_to_token(pad_id) or "[PAD]"
        # tokenizer.json may pin padding to a fixed length (sentence-transformers ships 128);
        # the longest text of each batch is all that is needed.
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        tokenizer.enable_padding(pad_id=int(pad_id), pad_token=pad_token)
        self.tokenizer = tokenizer

    def encode(self, texts: Sequence[str]) -> Encoded:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds: dict[str, npt.NDArray[Any]] = {}
        for name, ort_type in self._inputs.items():
            if name == "input_ids":
                value = ids
            elif name == "attention_mask":
                value = mask
            elif name == "token_type_ids":
                value = np.array([e.type_ids for e in encodings], dtype=np.int64)
            else:  # position_ids
                value = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape)
            feeds[name] = value.astype(numpy_dtype(ort_type), copy=False)
        return Encoded(
            feeds=feeds,
            attention_mask=mask,
            tokens=[int(n) for n in mask.sum(axis=1)],
            truncated=[bool(e.overflowing) for e in encodings],
        )
