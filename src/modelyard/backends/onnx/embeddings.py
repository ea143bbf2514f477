"""The ``embeddings`` task: tokenise, one padded run, pool over the attention mask, normalise."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.backends.onnx._rows import run_rows
from modelyard.backends.onnx.text import Encoded, TextEncoder
from modelyard.core.errors import ModelLoadError
from modelyard.core.types import EmbeddingRequest, EmbeddingResult

__all__ = ["EmbeddingTask", "pool"]

#: Outputs holding per-token vectors, in order of preference.
_TOKEN_OUTPUTS = ("last_hidden_state", "token_embeddings")
#: Outputs already pooled by the graph.
_POOLED_OUTPUTS = ("sentence_embedding", "sentence_embeddings", "embeddings", "pooler_output")


def pool(
    hidden: npt.NDArray[Any], mask: npt.NDArray[Any], pooling: str, normalize: bool
) -> npt.NDArray[np.float32]:
    """Token vectors ``[batch, seq, dim]`` (or already pooled ``[batch, dim]``) to one per row."""
    hidden = hidden.astype(np.float32, copy=False)
    if hidden.ndim == 3:
        if pooling == "cls":
            vectors = hidden[:, 0, :]
        else:
            weights = mask.astype(np.float32)[:, :, None]
            vectors = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    else:
        vectors = hidden
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, 1e-12)
    return np.ascontiguousarray(vectors, dtype=np.float32)


def pick_output(outputs: dict[str, int]) -> str:
    """The graph output to pool: per-token states first, then an already pooled vector."""
    for name in (*_TOKEN_OUTPUTS, *_POOLED_OUTPUTS):
        if name in outputs:
            return name
    for rank in (3, 2):
        for name, ndim in outputs.items():
            if ndim == rank:
                return name
    raise ModelLoadError(f"no output to build embeddings from ({', '.join(outputs)})")


class EmbeddingTask:
    def __init__(
        self,
        session: Any,
        encoder: TextEncoder,
        *,
        pooling: str,
        normalize: bool,
        rows_per_run: int,
    ) -> None:
        self._session = session
        self._encoder = encoder
        self._pooling = pooling
        self._normalize = normalize
        self._rows_per_run = rows_per_run
        outputs = {o.name: len(o.shape or ()) for o in session.get_outputs()}
        self.output = pick_output(outputs)
        shape = next(o.shape for o in session.get_outputs() if o.name == self.output)
        self.dimensions = shape[-1] if shape and isinstance(shape[-1], int) else None

    def _compute(self, encoded: Encoded) -> npt.NDArray[np.float32]:
        (hidden,) = self._session.run([self.output], encoded.feeds)
        return pool(hidden, encoded.attention_mask, self._pooling, self._normalize)

    def run(self, batch: Sequence[EmbeddingRequest]) -> list[EmbeddingResult]:
        texts = [text for request in batch for text in request.inputs]
        if not texts:
            return [EmbeddingResult(embeddings=[], prompt_tokens=0) for _ in batch]
        vectors, tokens, truncated = run_rows(
            self._encoder, texts, self._rows_per_run, self._compute
        )
        rows = vectors.tolist()
        results, start = [], 0
        for request in batch:
            end = start + len(request.inputs)
            results.append(
                EmbeddingResult(
                    embeddings=rows[start:end],
                    prompt_tokens=sum(tokens[start:end]),
                    truncated_inputs=sum(truncated[start:end]),
                )
            )
            start = end
        return results
