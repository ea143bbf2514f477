"""Running many texts of many requests through one padded session.run per chunk."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.backends.onnx.text import Encoded, TextEncoder

__all__ = ["run_rows"]

Rows = npt.NDArray[Any]


def run_rows(
    encoder: TextEncoder,
    texts: Sequence[str],
    rows_per_run: int,
    compute: Callable[[Encoded], Rows],
) -> tuple[Rows, list[int], list[bool]]:
    """``compute`` over every text, ``rows_per_run`` at a time; rows come back in input order.

    With more texts than one run takes, texts are sorted by length first so each run pads
    to a similar length instead of to the batch's longest text.
    """
    if len(texts) <= rows_per_run:
        encoded = encoder.encode(texts)
        return compute(encoded), encoded.tokens, encoded.truncated
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    parts: list[Rows] = []
    tokens: list[int] = [0] * len(texts)
    truncated: list[bool] = [False] * len(texts)
    for start in range(0, len(order), rows_per_run):
        chunk = order[start : start + rows_per_run]
        encoded = encoder.encode([texts[i] for i in chunk])
        parts.append(compute(encoded))
        for j, i in enumerate(chunk):
            tokens[i], truncated[i] = encoded.tokens[j], encoded.truncated[j]
    stacked = np.concatenate(parts, axis=0)
    result = np.empty_like(stacked)
    result[np.array(order)] = stacked
    return result, tokens, truncated
