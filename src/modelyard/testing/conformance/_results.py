"""Checks on what a backend returns: result types, rows per input, streams, health and info."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgspec

from modelyard.core.backend import BackendInfo, HealthReport
from modelyard.core.types import (
    V2_DATATYPES,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationResult,
    InferenceRequest,
    StreamChunk,
    Task,
    TensorRequest,
    TensorResult,
    TensorSpec,
)
from modelyard.testing.conformance._common import ConformanceError

__all__ = [
    "RESULT_TYPES",
    "check_health",
    "check_info",
    "check_results",
    "check_stream",
    "check_same_order",
]

RESULT_TYPES: dict[Task, type] = {
    Task.CHAT: GenerationResult,
    Task.COMPLETION: GenerationResult,
    Task.EMBEDDINGS: EmbeddingResult,
    Task.CLASSIFICATION: ClassificationResult,
    Task.TENSOR: TensorResult,
}
_FINISH_REASONS = ("stop", "length")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def check_results(
    task: Task,
    batch: Sequence[InferenceRequest],
    results: Sequence[Any],
    *,
    embedding_dim: int | None = None,
    tensor_rows_follow_inputs: bool = True,
) -> None:
    """One result per request, each of the task's result type with one row per input."""
    if not isinstance(results, list | tuple):
        raise ConformanceError(f"infer returned {type(results).__name__}, not a list of results")
    if len(results) != len(batch):
        raise ConformanceError(
            f"infer returned {_plural(len(results), 'result')} for a batch of "
            f"{_plural(len(batch), 'request')}; it must return one result per request, in order"
        )
    dims: set[int] = set()
    for i, (request, result) in enumerate(zip(batch, results, strict=True)):
        where = f"result {i} (of a batch of {len(batch)})"
        if isinstance(result, BaseException):
            raise ConformanceError(
                f"{where} is an exception for a valid request: {type(result).__name__}: {result}"
            )
        expected = RESULT_TYPES[task]
        if not isinstance(result, expected):
            raise ConformanceError(
                f"{where} is a {type(result).__name__}; a {task.value} request must get "
                f"a {expected.__name__}"
            )
        if isinstance(result, EmbeddingResult):
            assert isinstance(request, EmbeddingRequest)
            dims |= _check_embedding(request, result, where)
        elif isinstance(result, ClassificationResult):
            assert isinstance(request, ClassificationRequest)
            _check_classification(request, result, where)
        elif isinstance(result, GenerationResult):
            assert isinstance(request, ChatRequest | CompletionRequest)
            _check_generation(request, result, where)
        elif isinstance(result, TensorResult):
            assert isinstance(request, TensorRequest)
            _check_tensor_result(request, result, where, tensor_rows_follow_inputs)
    if len(dims) > 1:
        raise ConformanceError(
            f"embeddings of one model have different dimensions: {sorted(dims)}"
        )
    if dims and embedding_dim is not None and dims != {embedding_dim}:
        raise ConformanceError(
            f"embedding dimension is {dims.pop()}, expected {embedding_dim} (embedding_dim)"
        )


def _check_embedding(request: EmbeddingRequest, result: EmbeddingResult, where: str) -> set[int]:
    rows, inputs = len(result.embeddings), len(request.inputs)
    if rows != inputs:
        raise ConformanceError(
            f"{where}: returned {_plural(rows, 'embedding')} for {_plural(inputs, 'input')}; "
            "an EmbeddingResult holds one row per input"
        )
    dims = set()
    for j, row in enumerate(result.embeddings):
        if len(row) == 0:
            raise ConformanceError(f"{where}: embedding {j} is empty")
        if not all(isinstance(x, float | int) and math.isfinite(x) for x in row):
            raise ConformanceError(
                f"{where}: embedding {j} holds a value that is not a finite float"
            )
        dims.add(len(row))
    _check_count(where, "prompt_tokens", result.prompt_tokens)
    return dims


def _check_classification(
    request: ClassificationRequest, result: ClassificationResult, where: str
) -> None:
    rows, inputs = len(result.labels), len(request.inputs)
    if rows != inputs:
        raise ConformanceError(
            f"{where}: returned {_plural(rows, 'label list')} for {_plural(inputs, 'input')}; "
            "a ClassificationResult holds one list of labels per input"
        )
    for j, labels in enumerate(result.labels):
        if not labels:
            raise ConformanceError(f"{where}: input {j} got no labels")
        if request.top_k is not None and len(labels) > request.top_k:
            raise ConformanceError(
                f"{where}: input {j} got {len(labels)} labels for top_k = {request.top_k}"
            )
        for label in labels:
            if not isinstance(label.label, str) or not label.label:
                raise ConformanceError(f"{where}: input {j} has a label without a name")
            if not isinstance(label.score, float | int) or not math.isfinite(label.score):
                raise ConformanceError(f"{where}: label {label.label!r} has no finite score")
        scores = [label.score for label in labels]
        if scores != sorted(scores, reverse=True):
            raise ConformanceError(
                f"{where}: the labels of input {j} are not sorted best first ({scores}); "
                "v2 and the cache take the first label as the answer"
            )
    _check_count(where, "prompt_tokens", result.prompt_tokens)


def _check_generation(
    request: ChatRequest | CompletionRequest, result: GenerationResult, where: str
) -> None:
    if not isinstance(result.text, str):
        raise ConformanceError(f"{where}: text is {type(result.text).__name__}, not str")
    if result.finish_reason not in _FINISH_REASONS:
        raise ConformanceError(
            f"{where}: finish_reason is {result.finish_reason!r}, not 'stop' or 'length'"
        )
    _check_usage(where, result.prompt_tokens, result.completion_tokens, request.params.max_tokens)


def _check_usage(where: str, prompt: Any, completion: Any, max_tokens: int | None) -> None:
    _check_count(where, "prompt_tokens", prompt)
    _check_count(where, "completion_tokens", completion)
    if prompt == 0:
        raise ConformanceError(f"{where}: prompt_tokens is 0 for a prompt that is not empty")
    if max_tokens is not None and completion > max_tokens:
        raise ConformanceError(
            f"{where}: completion_tokens is {completion}, more than max_tokens = {max_tokens}"
        )


def _check_count(where: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConformanceError(f"{where}: {name} is {value!r}, not a count (an int >= 0)")


def _elements(data: Any) -> int:
    size = getattr(data, "size", None)  # a numpy array
    return int(size) if isinstance(size, int) else len(data)


def _check_tensor_result(
    request: TensorRequest, result: TensorResult, where: str, rows_follow_inputs: bool
) -> None:
    if not result.outputs:
        raise ConformanceError(f"{where}: a TensorResult without outputs")
    names = [t.name for t in result.outputs]
    if request.outputs is not None and not set(names) <= set(request.outputs):
        raise ConformanceError(
            f"{where}: returned outputs {names} when the request asked for {list(request.outputs)}"
        )
    input_rows = {t.shape[0] for t in request.inputs if t.shape}
    for tensor in result.outputs:
        _check_tensor(where, tensor.name, tensor.datatype, tensor.shape)
        expected = math.prod(tensor.shape)
        held = _elements(tensor.data)
        if held != expected:
            raise ConformanceError(
                f"{where}: output {tensor.name!r} holds {held} values for shape "
                f"{list(tensor.shape)} ({expected}); data is flat, row-major"
            )
        if rows_follow_inputs and len(input_rows) == 1 and tensor.shape:
            (rows,) = input_rows
            if tensor.shape[0] != rows:
                raise ConformanceError(
                    f"{where}: output {tensor.name!r} has {tensor.shape[0]} rows for inputs of "
                    f"{rows} rows (set tensor_rows_follow_inputs = False if the model reduces "
                    "the batch axis)"
                )


def _check_tensor(where: str, name: Any, datatype: Any, shape: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ConformanceError(f"{where}: a tensor without a name")
    if datatype not in V2_DATATYPES:
        raise ConformanceError(
            f"{where}: tensor {name!r} has datatype {datatype!r}, not a v2 datatype "
            f"({', '.join(sorted(V2_DATATYPES))})"
        )
    if not isinstance(shape, tuple | list) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise ConformanceError(f"{where}: tensor {name!r} has shape {shape!r}, not ints")


def check_stream(chunks: Sequence[Any], max_tokens: int | None) -> None:
    """Chunks of text, the last (and only the last) with ``finish_reason`` and token counts."""
    if not chunks:
        raise ConformanceError("stream ended without yielding a chunk (and without finish_reason)")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, StreamChunk):
            raise ConformanceError(f"stream chunk {i} is a {type(chunk).__name__}, not StreamChunk")
        if not isinstance(chunk.text, str):
            raise ConformanceError(f"stream chunk {i} has text of type {type(chunk.text).__name__}")
        if chunk.finish_reason is not None and i != len(chunks) - 1:
            raise ConformanceError(
                f"stream chunk {i} carries finish_reason but {len(chunks) - 1 - i} more followed; "
                "the chunk with finish_reason must be the last"
            )
    last = chunks[-1]
    if last.finish_reason is None:
        raise ConformanceError(
            f"stream ended without finish_reason ({_plural(len(chunks), 'chunk')}); the last "
            "chunk must carry finish_reason, prompt_tokens and completion_tokens"
        )
    if last.finish_reason not in _FINISH_REASONS:
        raise ConformanceError(
            f"stream ended with finish_reason {last.finish_reason!r}, not 'stop' or 'length'"
        )
    if last.prompt_tokens is None or last.completion_tokens is None:
        raise ConformanceError(
            "the last stream chunk has finish_reason but no token counts "
            f"(prompt_tokens={last.prompt_tokens}, completion_tokens={last.completion_tokens})"
        )
    _check_usage("the last stream chunk", last.prompt_tokens, last.completion_tokens, max_tokens)


def _close(a: Any, b: Any) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-3, abs_tol=1e-4)


def _flat(data: Any) -> list[Any]:
    ravel = getattr(data, "ravel", None)
    return list(ravel().tolist()) if callable(ravel) else list(data)


def same_answer(a: Any, b: Any) -> bool:
    """Whether two results of one task agree (floats within a small tolerance)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, GenerationResult):
        return bool(a.text == b.text)
    if isinstance(a, EmbeddingResult):
        return len(a.embeddings) == len(b.embeddings) and all(
            len(x) == len(y) and all(_close(p, q) for p, q in zip(x, y, strict=True))
            for x, y in zip(a.embeddings, b.embeddings, strict=True)
        )
    if isinstance(a, ClassificationResult):
        return len(a.labels) == len(b.labels) and all(
            [label.label for label in x] == [label.label for label in y]
            and all(_close(p.score, q.score) for p, q in zip(x, y, strict=True))
            for x, y in zip(a.labels, b.labels, strict=True)
        )
    if isinstance(a, TensorResult):
        if [t.name for t in a.outputs] != [t.name for t in b.outputs]:
            return False
        for x, y in zip(a.outputs, b.outputs, strict=True):
            fx, fy = _flat(x.data), _flat(y.data)
            if len(fx) != len(fy):
                return False
            if x.datatype == "BYTES":
                if fx != fy:
                    return False
            elif not all(_close(p, q) for p, q in zip(fx, fy, strict=True)):
                return False
        return True
    return bool(a == b)


def check_same_order(together: Sequence[Any], alone: Sequence[Any]) -> None:
    """Result ``i`` of a batch must be the answer to request ``i`` asked alone."""
    for i, (got, want) in enumerate(zip(together, alone, strict=True)):
        if same_answer(got, want):
            continue
        matches = [j for j, other in enumerate(alone) if j != i and same_answer(got, other)]
        if matches:
            raise ConformanceError(
                f"result {i} of the batch is the answer to request {matches[0]}: results "
                "must come back in the order of the requests"
            )
        raise ConformanceError(
            f"result {i} of the batch differs from the answer to the same request sent alone "
            "(set deterministic = False if the backend samples even at temperature 0)"
        )


def check_health(report: Any) -> None:
    if not isinstance(report, HealthReport):
        raise ConformanceError(f"health() returned {type(report).__name__}, not a HealthReport")
    if not report.healthy:
        raise ConformanceError(f"health() reports a loaded model unhealthy: {report.detail!r}")


def check_info(info: Any) -> None:
    if not isinstance(info, BackendInfo):
        raise ConformanceError(f"info() returned {type(info).__name__}, not a BackendInfo")
    for side in ("inputs", "outputs"):
        for spec in getattr(info, side):
            if not isinstance(spec, TensorSpec):
                raise ConformanceError(
                    f"info().{side} holds a {type(spec).__name__}, not a TensorSpec"
                )
            _check_tensor(f"info().{side}", spec.name, spec.datatype, spec.shape)
            if any(d < -1 for d in spec.shape):
                raise ConformanceError(
                    f"info().{side}: tensor {spec.name!r} has shape {list(spec.shape)}; "
                    "dimensions are sizes, or -1 for a dynamic axis"
                )
    if not isinstance(info.platform, str):
        raise ConformanceError("info().platform is not a str")
    try:
        msgspec.json.encode(info.parameters)
    except (TypeError, msgspec.EncodeError) as exc:
        raise ConformanceError(
            f"info().parameters cannot be shown as JSON (metadata endpoints): {exc}"
        ) from None
