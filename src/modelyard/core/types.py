"""The protocol-neutral request and result types every backend speaks.

Controllers translate OpenAI and v2 wire formats into these; backends never see HTTP.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

__all__ = [
    "V2_DATATYPES",
    "ChatMessage",
    "ChatRequest",
    "ClassificationRequest",
    "ClassificationResult",
    "CompletionRequest",
    "EmbeddingRequest",
    "EmbeddingResult",
    "FinishReason",
    "GenerationParams",
    "GenerationResult",
    "InferenceRequest",
    "InferenceResult",
    "Label",
    "StreamChunk",
    "Task",
    "Tensor",
    "TensorRequest",
    "TensorResult",
    "TensorSpec",
]


class Task(enum.StrEnum):
    """What a model version serves; a backend declares the subset it supports."""

    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDINGS = "embeddings"
    CLASSIFICATION = "classification"
    TENSOR = "tensor"


FinishReason = Literal["stop", "length"]

#: Open Inference Protocol v2 tensor datatypes.
V2_DATATYPES = frozenset(
    {"BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
     "FP16", "FP32", "FP64", "BYTES"}
)


#: Integers a request may carry are 64-bit: a larger one is refused (400), not carried into
#: cache keys (msgpack) or a runtime.
_INT64_MAX = 2**63 - 1
_Int64 = Annotated[int, Meta(ge=-(2**63), le=_INT64_MAX)]


class GenerationParams(Struct, frozen=True, kw_only=True):
    """Sampling parameters shared by chat and completion requests."""

    max_tokens: Annotated[int, Meta(ge=1, le=_INT64_MAX)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0, le=_INT64_MAX)] | None = None
    seed: _Int64 | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[_Int64, float] | None = None

    @property
    def deterministic(self) -> bool:
        """True when the same input always yields the same output (greedy or seeded)."""
        return self.temperature == 0.0 or self.seed is not None


class ChatMessage(Struct, frozen=True):
    role: str
    content: str


class ChatRequest(Struct, frozen=True, tag="chat"):
    messages: tuple[ChatMessage, ...]
    params: GenerationParams = GenerationParams()
    task: Task = Task.CHAT


class CompletionRequest(Struct, frozen=True, tag="completion"):
    prompt: str
    params: GenerationParams = GenerationParams()
    task: Task = Task.COMPLETION


class EmbeddingRequest(Struct, frozen=True, tag="embeddings"):
    inputs: tuple[str, ...]
    task: Task = Task.EMBEDDINGS


class ClassificationRequest(Struct, frozen=True, tag="classification"):
    inputs: tuple[str, ...]
    top_k: int | None = None
    task: Task = Task.CLASSIFICATION


class Tensor(Struct, frozen=True):
    """A named tensor; ``data`` is flat, row-major (a list, or a numpy array inside backends)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)


class TensorSpec(Struct, frozen=True):
    """Metadata of a model input or output; -1 marks a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]


class TensorRequest(Struct, frozen=True, tag="tensor"):
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...] | None = None
    task: Task = Task.TENSOR


InferenceRequest = (
    ChatRequest | CompletionRequest | EmbeddingRequest | ClassificationRequest | TensorRequest
)


class GenerationResult(Struct, frozen=True):
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


class StreamChunk(Struct, frozen=True):
    """One piece of a streamed generation; the last one carries ``finish_reason`` and usage."""

    text: str
    finish_reason: FinishReason | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class EmbeddingResult(Struct, frozen=True):
    embeddings: list[list[float]]
    prompt_tokens: int
    truncated_inputs: int = 0


class Label(Struct, frozen=True):
    label: str
    score: float


class ClassificationResult(Struct, frozen=True):
    labels: list[list[Label]]
    prompt_tokens: int = 0


class TensorResult(Struct, frozen=True):
    outputs: list[Tensor]


InferenceResult = GenerationResult | EmbeddingResult | ClassificationResult | TensorResult


def to_builtins(value: Any) -> Any:
    """Convert a Struct tree to JSON-ready builtins."""
    return msgspec.to_builtins(value)
