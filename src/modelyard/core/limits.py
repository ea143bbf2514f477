"""The ``[limits]`` section: request limits per model (422) and slow-client timeouts."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct, field

from modelyard.core.errors import UnprocessableError
from modelyard.core.types import (
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    InferenceRequest,
)

__all__ = ["LimitSettings", "RequestLimits", "apply_limits"]

Positive = Annotated[int, Meta(ge=1)]


class RequestLimits(Struct, forbid_unknown_fields=True, kw_only=True):
    """What one request may ask of a model; None is no limit."""

    #: Largest ``max_tokens``; a request that names none is capped here.
    max_tokens: Positive | None = None
    #: Characters of input text in one request (messages, prompt, or every input together).
    max_input_chars: Positive | None = None
    #: Texts in one embeddings or classification request.
    max_inputs: Positive | None = None


class LimitSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[limits]``: defaults for every model, ``[limits.models.NAME]`` overrides per model."""

    max_tokens: Positive | None = None
    max_input_chars: Positive | None = None
    max_inputs: Positive | None = None
    models: dict[str, RequestLimits] = field(default_factory=dict)
    #: uvicorn ``timeout_keep_alive``: an idle keep-alive connection is closed after this.
    keep_alive_timeout_s: Annotated[int, Meta(ge=1)] = 5
    #: A request body that sends nothing for this long gets 408 and its connection closed.
    body_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    #: uvicorn ``h11_max_incomplete_event_size``: the most header bytes buffered (h11).
    max_header_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024
    #: The HTTP/1.1 parser. ``httptools`` (default) costs about 0.8 ms less per request than
    #: ``h11`` on this project's 2-core bench; ``h11`` also enforces ``max_header_bytes``
    #: (httptools buffers request heads without a bound — run it behind a proxy that limits
    #: them, or choose h11, on untrusted networks).
    http_parser: Literal["h11", "httptools"] = "httptools"
    #: uvicorn ``limit_concurrency``: connections beyond this get 503 (our capacity).
    max_connections: Positive | None = None

    def for_model(self, name: str) -> RequestLimits:
        """The defaults with ``name``'s own entries laid over them."""
        merged = {
            "max_tokens": self.max_tokens,
            "max_input_chars": self.max_input_chars,
            "max_inputs": self.max_inputs,
        }
        own = self.models.get(name)
        if own is not None:
            merged.update({k: v for k, v in msgspec.structs.asdict(own).items() if v is not None})
        return RequestLimits(**merged)


def apply_limits(limits: RequestLimits, model: str, request: InferenceRequest) -> InferenceRequest:
    """Refuse a request over ``limits`` with 422; cap an unstated ``max_tokens`` at the limit."""
    texts = _texts(request)
    if limits.max_inputs is not None and len(texts) > limits.max_inputs and isinstance(
        request, EmbeddingRequest | ClassificationRequest
    ):
        raise UnprocessableError(
            f"model {model!r} takes at most {limits.max_inputs} inputs per request, "
            f"not {len(texts)}"
        )
    chars = sum(len(t) for t in texts)
    if limits.max_input_chars is not None and chars > limits.max_input_chars:
        raise UnprocessableError(
            f"input of {chars} characters exceeds model {model!r}'s limit of "
            f"{limits.max_input_chars}"
        )
    if limits.max_tokens is None or not isinstance(request, ChatRequest | CompletionRequest):
        return request
    asked = request.params.max_tokens
    if asked is not None and asked > limits.max_tokens:
        raise UnprocessableError(
            f"max_tokens {asked} exceeds model {model!r}'s limit of {limits.max_tokens}"
        )
    if asked is None:
        params = msgspec.structs.replace(request.params, max_tokens=limits.max_tokens)
        return msgspec.structs.replace(request, params=params)
    return request


def _texts(request: InferenceRequest) -> list[str]:
    if isinstance(request, ChatRequest):
        return [m.content for m in request.messages]
    if isinstance(request, CompletionRequest):
        return [request.prompt]
    if isinstance(request, EmbeddingRequest | ClassificationRequest):
        return list(request.inputs)
    return []
