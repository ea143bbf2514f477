"""The ``classification`` task: logits -> softmax (or sigmoid) -> labels from config.json."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.backends.onnx._rows import run_rows
from modelyard.backends.onnx.text import Encoded, TextEncoder
from modelyard.core.errors import ModelLoadError
from modelyard.core.types import ClassificationRequest, ClassificationResult, Label

__all__ = ["ClassificationTask", "label_names"]


def label_names(config: dict[str, Any], count: int) -> list[str]:
    """``id2label`` in index order; ``LABEL_i`` where config.json names none."""
    raw = config.get("id2label") or {}
    names = {}
    for key, value in raw.items():
        try:
            names[int(key)] = str(value)
        except (TypeError, ValueError):
            raise ModelLoadError(f"config.json id2label has a non-integer key {key!r}") from None
    return [names.get(i, f"LABEL_{i}") for i in range(count)]


def scores(logits: npt.NDArray[Any], multi_label: bool) -> npt.NDArray[np.float32]:
    values: npt.NDArray[np.float32] = logits.astype(np.float32, copy=False)
    if multi_label:
        return (1.0 / (1.0 + np.exp(-values))).astype(np.float32)
    shifted = np.exp(values - values.max(axis=1, keepdims=True))
    softmax: npt.NDArray[np.float32] = shifted / shifted.sum(axis=1, keepdims=True)
    return softmax


class ClassificationTask:
    def __init__(
        self, session: Any, encoder: TextEncoder, config: dict[str, Any], *, rows_per_run: int
    ) -> None:
        self._session = session
        self._encoder = encoder
        self._rows_per_run = rows_per_run
        outputs = {o.name: o.shape for o in session.get_outputs()}
        self.output = "logits" if "logits" in outputs else next(iter(outputs))
        shape = outputs[self.output] or []
        if len(shape) != 2:
            raise ModelLoadError(f"classification output {self.output!r} must be [batch, labels]")
        count = shape[1] if isinstance(shape[1], int) else len(config.get("id2label") or {})
        if count <= 0:
            raise ModelLoadError("cannot tell the number of labels; add id2label to config.json")
        self.labels = label_names(config, count)
        self._multi_label = config.get("problem_type") == "multi_label_classification"

    def _compute(self, encoded: Encoded) -> npt.NDArray[np.float32]:
        (logits,) = self._session.run([self.output], encoded.feeds)
        return scores(logits, self._multi_label)

    def run(self, batch: Sequence[ClassificationRequest]) -> list[ClassificationResult]:
        texts = [text for request in batch for text in request.inputs]
        if not texts:
            return [ClassificationResult(labels=[]) for _ in batch]
        probs, tokens, _ = run_rows(self._encoder, texts, self._rows_per_run, self._compute)
        order = np.argsort(-probs, axis=1, kind="stable")
        results, start = [], 0
        for request in batch:
            end = start + len(request.inputs)
            keep = request.top_k if request.top_k else len(self.labels)
            ranked = [
                [Label(self.labels[j], float(probs[row, j])) for j in order[row, :keep]]
                for row in range(start, end)
            ]
            results.append(
                ClassificationResult(labels=ranked, prompt_tokens=sum(tokens[start:end]))
            )
            start = end
        return results
