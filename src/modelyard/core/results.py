"""Whether a backend's result can answer its request: the right kind, one row per input."""

from __future__ import annotations

from modelyard.core.types import (
    ClassificationRequest,
    ClassificationResult,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    TensorRequest,
    TensorResult,
)

__all__ = ["result_mismatch"]


def result_mismatch(request: InferenceRequest, result: InferenceResult) -> str:
    """Why ``result`` cannot answer ``request`` ('' when it can): its kind, or rows per input."""
    if isinstance(request, EmbeddingRequest):
        if not isinstance(result, EmbeddingResult):
            return _wrong_kind(request)
        return _rows(len(result.embeddings), len(request.inputs), "embedding")
    if isinstance(request, ClassificationRequest):
        if not isinstance(result, ClassificationResult):
            return _wrong_kind(request)
        return _rows(len(result.labels), len(request.inputs), "classification")
    expected = TensorResult if isinstance(request, TensorRequest) else GenerationResult
    return "" if isinstance(result, expected) else _wrong_kind(request)


def _wrong_kind(request: InferenceRequest) -> str:
    return f"the wrong kind of result for {request.task.value}"


def _rows(rows: int, inputs: int, what: str) -> str:
    if rows == inputs:
        return ""
    return (
        f"{rows} {what} {'row' if rows == 1 else 'rows'} for "
        f"{inputs} {'input' if inputs == 1 else 'inputs'}"
    )
