"""OpenAI-compatible routes: translate the wire format to core requests and back."""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.response import Stream
from msgspec import Meta

from modelyard.api.problems import client_detail
from modelyard.api.schema import StreamedOperation, problems
from modelyard.api.security import Caller
from modelyard.api.wire import cache_directive, cache_headers, generation_params, model_headers
from modelyard.core.errors import BadRequestError, ModelyardError
from modelyard.core.pipeline import StreamAnswer
from modelyard.core.response_cache import CacheDirective, CacheStatus
from modelyard.core.service import InferenceService
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    StreamChunk,
)

__all__ = [
    "ChatCompletionBody",
    "CompletionBody",
    "EmbeddingBody",
    "OpenAIController",
    "WireReply",
    "chat_reply",
    "chat_request",
    "completion_reply",
    "completion_requests",
    "embedding_reply",
    "embedding_request",
]

log = logging.getLogger(__name__)


# -- wire types ----------------------------------------------------------------------------
# Lenient about members we do not know (OpenAI clients send fields we ignore), strict about
# the values of those we read: a range or a length the server would refuse is a constraint on
# the Struct, so the decoder refuses it (400) and the OpenAPI schema says so. A value the route
# refuses in its own words ("... not supported") is limited in the schema alone (``_only``).

#: Integers are 64-bit, as OpenAI's are: a larger one is refused, not carried into the cache
#: keys (msgpack) or a runtime.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_Count = Annotated[int, Meta(ge=1, le=_INT64_MAX)]
#: Token ids are JSON object keys that msgspec reads as ints; the pattern is the same set of
#: strings (no sign but on zero, no leading zero, at most 18 digits).
_TokenBias = Annotated[
    dict[Annotated[int, Meta(ge=0, le=10**18 - 1)], float],
    Meta(extra_json_schema={"extra": {"propertyNames": {"pattern": r"^(-?0|[1-9][0-9]{0,17})$"}}}),
]
#: One text or several (at least one). Litestar drops a constraint that sits on one member of
#: a union, so the schema is spelt out beside the type.
_TEXTS = Meta(extra_json_schema={"extra": {"oneOf": [
    {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
]}})
_Texts = Annotated[str | Annotated[list[str], Meta(min_length=1)], _TEXTS]


def _only(*values: Any, description: str) -> Meta:
    """A member the schema limits to ``values`` while the decoder takes any value of its type:
    the route refuses the others itself, saying what is not supported (400)."""
    return Meta(description=description, extra_json_schema={"extra": {"enum": list(values)}})


class ContentPart(msgspec.Struct):
    """A part of a message's content: only text parts are supported."""

    type: Literal["text"]
    text: str


class WireMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    # The ranges are GenerationParams' (core/types.py); tests/api/test_openapi.py keeps them
    # the same.
    model: str
    max_tokens: _Count | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Meta(ge=0, le=_INT64_MAX)] | None = None
    n: Annotated[int, _only(1, description="Only one choice is supported")] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Meta(ge=_INT64_MIN, le=_INT64_MAX)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    logit_bias: _TokenBias | None = None
    logprobs: Annotated[
        bool | int | None, _only(False, 0, None, description="Log probabilities are not supported")
    ] = None
    user: str | None = None


class ChatCompletionBody(_Sampling, kw_only=True):
    messages: Annotated[list[WireMessage], Meta(min_length=1)]
    max_completion_tokens: _Count | None = None


class CompletionBody(_Sampling, kw_only=True):
    #: A stream takes one prompt: the route refuses several (400), and the schema says so.
    __schema_extra__: ClassVar[dict[str, Any]] = {
        "schema_if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
        "then": {"properties": {"prompt": {"oneOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 1},
        ]}}},
    }
    #: One prompt, or several: one choice each.
    prompt: _Texts
    echo: bool = False
    suffix: str | None = None


class EmbeddingBody(msgspec.Struct, kw_only=True):
    model: str
    #: Token-id arrays are refused by the route, saying they are not supported.
    input: Annotated[str | list[Any], _TEXTS]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: _Count | None = None
    user: str | None = None


class ClassifyBody(msgspec.Struct, kw_only=True):
    model: str
    input: _Texts
    #: How many labels per input, best first; omitted: all of them. 0 and below are refused
    #: rather than read as "none" or "all".
    top_k: _Count | None = None


# -- translation ---------------------------------------------------------------------------


def _params(body: _Sampling, max_tokens: int | None) -> GenerationParams:
    if body.n != 1:
        raise BadRequestError("only n=1 is supported")
    if body.logprobs:
        raise BadRequestError("logprobs are not supported")
    return generation_params({
        "max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "top_k": body.top_k, "seed": body.seed, "stop": body.stop,
        "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
        "logit_bias": body.logit_bias,
    })


def _message_text(message: WireMessage, index: int) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise BadRequestError(
                f"messages[{index}]: content part type {part.type!r} is not supported"
            )
        texts.append(part.text)
    return "".join(texts)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _encode_embedding(vector: list[float], fmt: str) -> list[float] | str:
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


class _SSE:
    """Formats OpenAI stream chunks as server-sent events ending in ``data: [DONE]``."""

    def __init__(self, kind: Literal["chat", "text"], model: str, include_usage: bool) -> None:
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _event(self, payload: dict[str, Any]) -> bytes:
        return b"data: " + msgspec.json.encode(payload) + b"\n\n"

    def _choice(self, chunk: StreamChunk, first: bool) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or first else {}
            if first:
                delta["role"] = "assistant"
            return {
                "index": 0,
                "delta": delta,
                "finish_reason": chunk.finish_reason,
                "logprobs": None,
            }
        return {
            "index": 0,
            "text": chunk.text,
            "finish_reason": chunk.finish_reason,
            "logprobs": None,
        }

    def _frame(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        payload: dict[str, Any] = {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            payload["usage"] = usage
        return self._event(payload)

    async def events(self, chunks: AsyncIterator[StreamChunk]) -> AsyncIterator[bytes]:
        first = True
        usage = None
        try:
            async for chunk in chunks:
                if chunk.finish_reason is not None:
                    usage = _usage(chunk.prompt_tokens or 0, chunk.completion_tokens or 0)
                if chunk.text or chunk.finish_reason is not None or first:
                    yield self._frame([self._choice(chunk, first)])
                    first = False
        except asyncio.CancelledError:
            raise
        except ModelyardError as exc:
            message = client_detail(exc.status_code, exc.type_slug, exc.detail)
            if message != exc.detail:
                log.error("stream of %s failed: %s", self.model, exc.detail)
            yield self._event(
                {"error": {"message": message, "type": exc.type_slug, "code": exc.status_code}}
            )
        except Exception:  # noqa: BLE001 - the stream is already 200; report in-band
            log.exception("stream of %s failed", self.model)
            yield self._event(
                {
                    "error": {
                        "message": "backend failed mid-stream",
                        "type": "backend-error",
                        "code": 500,
                    }
                }
            )
        else:
            if self.include_usage and usage is not None:
                yield self._frame([], usage)
        yield b"data: [DONE]\n\n"


def _stream_response(sse: _SSE, answer: StreamAnswer) -> Stream:
    headers = {
        **model_headers(answer.version),
        **cache_headers(answer.cache),
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    }
    return Stream(sse.events(answer.chunks), media_type="text/event-stream", headers=headers)


# -- unary answers, shared by the routes and batch jobs (api/batches.py) -------------------


class WireReply(NamedTuple):
    """A unary answer's JSON body and the headers that go with it."""

    body: dict[str, Any]
    headers: dict[str, str]


def chat_request(data: ChatCompletionBody) -> ChatRequest:
    if not data.messages:
        raise BadRequestError("messages must not be empty")
    messages = tuple(
        ChatMessage(m.role, _message_text(m, i)) for i, m in enumerate(data.messages)
    )
    return ChatRequest(messages, _params(data, data.max_completion_tokens or data.max_tokens))


async def chat_reply(
    service: InferenceService, data: ChatCompletionBody, directive: CacheDirective | None
) -> WireReply:
    """``POST /v1/chat/completions`` without streaming."""
    answer = await service.infer(data.model, chat_request(data), cache=directive)
    version, result = answer.version, answer.result
    assert isinstance(result, GenerationResult)
    body = {
        "id": "chatcmpl-" + uuid.uuid4().hex,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": version.name,
        "system_fingerprint": f"{version.name}:{version.version}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": None,
            }
        ],
        "usage": _usage(result.prompt_tokens, result.completion_tokens),
    }
    return WireReply(body, {**model_headers(version), **cache_headers(answer.cache)})


def completion_requests(data: CompletionBody) -> list[CompletionRequest]:
    prompts = [data.prompt] if isinstance(data.prompt, str) else data.prompt
    if not prompts:
        raise BadRequestError("prompt must not be empty")
    params = _params(data, data.max_tokens if data.max_tokens is not None else 16)
    return [CompletionRequest(p, params) for p in prompts]


async def completion_reply(
    service: InferenceService, data: CompletionBody, directive: CacheDirective | None
) -> WireReply:
    """``POST /v1/completions`` without streaming: one choice per prompt."""
    requests = completion_requests(data)
    answers = await asyncio.gather(
        *(service.infer(data.model, r, cache=directive) for r in requests)
    )
    version = answers[0].version
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for i, answer in enumerate(answers):
        result = answer.result
        assert isinstance(result, GenerationResult)
        text = (requests[i].prompt + result.text) if data.echo else result.text
        choices.append(
            {"index": i, "text": text, "finish_reason": result.finish_reason, "logprobs": None}
        )
        prompt_tokens += result.prompt_tokens
        completion_tokens += result.completion_tokens
    body = {
        "id": "cmpl-" + uuid.uuid4().hex,
        "object": "text_completion",
        "created": int(time.time()),
        "model": version.name,
        "system_fingerprint": f"{version.name}:{version.version}",
        "choices": choices,
        "usage": _usage(prompt_tokens, completion_tokens),
    }
    statuses = {answer.cache for answer in answers}
    status = statuses.pop() if len(statuses) == 1 else CacheStatus.MISS
    return WireReply(body, {**model_headers(version), **cache_headers(status)})


def embedding_request(data: EmbeddingBody) -> EmbeddingRequest:
    if isinstance(data.input, str):
        texts = [data.input]
    elif all(isinstance(x, str) for x in data.input):
        texts = list(data.input)
    else:
        raise BadRequestError("input must be text; token-id arrays are not supported")
    if not texts:
        raise BadRequestError("input must not be empty")
    return EmbeddingRequest(tuple(texts))


async def embedding_reply(
    service: InferenceService, data: EmbeddingBody, directive: CacheDirective | None
) -> WireReply:
    """``POST /v1/embeddings``."""
    answer = await service.infer(data.model, embedding_request(data), cache=directive)
    version, result = answer.version, answer.result
    assert isinstance(result, EmbeddingResult)
    if (
        data.dimensions is not None
        and result.embeddings
        and data.dimensions != len(result.embeddings[0])
    ):
        raise BadRequestError(
            f"model {version.name!r} has {len(result.embeddings[0])} dimensions, "
            f"not {data.dimensions}"
        )
    body = {
        "object": "list",
        "model": version.name,
        "data": [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encode_embedding(v, data.encoding_format),
            }
            for i, v in enumerate(result.embeddings)
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "total_tokens": result.prompt_tokens,
            "truncated_inputs": result.truncated_inputs,
        },
    }
    return WireReply(body, {**model_headers(version), **cache_headers(answer.cache)})


# -- routes --------------------------------------------------------------------------------

#: What an inference route answers besides a body it cannot decode (400, added with the
#: errors every route shares by api/schema.py): no such model, over its limits, the model
#: failed, is unavailable or too slow.
_INFERENCE_ERRORS = problems(404, 422, 503, 504)


class OpenAIController(Controller):
    path = "/v1"
    tags = ("OpenAI",)

    @get("/models")
    async def list_models(self, service: InferenceService, principal: Caller) -> dict[str, Any]:
        """Models that can answer now (their active version serving) and the caller may use."""
        created = int(service.started_wall)
        data = [
            {
                "id": card.name,
                "object": "model",
                "created": created,
                "owned_by": "modelyard",
                "version": card.version,
                "task": card.task.value if card.task else None,
                "backend": card.backend,
            }
            for card in service.model_cards(principal)
        ]
        return {"object": "list", "data": data}

    @post("/chat/completions", status_code=200, responses=_INFERENCE_ERRORS,
          operation_class=StreamedOperation)
    async def chat_completions(
        self, data: ChatCompletionBody, service: InferenceService, request: Request[Any, Any, Any]
    ) -> Response[Any] | Stream:
        """Chat with a model using its chat template; ``stream: true`` answers with SSE."""
        directive = cache_directive(request)
        if data.stream:
            started = await service.stream(data.model, chat_request(data), cache=directive)
            include = bool(data.stream_options and data.stream_options.include_usage)
            return _stream_response(_SSE("chat", started.version.name, include), started)
        reply = await chat_reply(service, data, directive)
        return Response(reply.body, headers=reply.headers)

    @post("/completions", status_code=200, responses=_INFERENCE_ERRORS,
          operation_class=StreamedOperation)
    async def completions(
        self, data: CompletionBody, service: InferenceService, request: Request[Any, Any, Any]
    ) -> Response[Any] | Stream:
        """Raw text completion; a list of prompts gives one choice per prompt."""
        if data.stream:
            requests = completion_requests(data)
            if len(requests) != 1:
                raise BadRequestError("streaming takes a single prompt")
            started = await service.stream(
                data.model, requests[0], cache=cache_directive(request)
            )
            include = bool(data.stream_options and data.stream_options.include_usage)
            return _stream_response(_SSE("text", started.version.name, include), started)
        reply = await completion_reply(service, data, cache_directive(request))
        return Response(reply.body, headers=reply.headers)

    @post("/embeddings", status_code=200, responses=_INFERENCE_ERRORS)
    async def embeddings(
        self, data: EmbeddingBody, service: InferenceService, request: Request[Any, Any, Any]
    ) -> Response[Any]:
        """Embed one text or a list of texts (``encoding_format`` float or base64)."""
        reply = await embedding_reply(service, data, cache_directive(request))
        return Response(reply.body, headers=reply.headers)

    @post("/classify", status_code=200, responses=_INFERENCE_ERRORS)
    async def classify(
        self, data: ClassifyBody, service: InferenceService, request: Request[Any, Any, Any]
    ) -> Response[Any]:
        """Classify texts: labels with softmax scores, best first (modelyard extension)."""
        texts = [data.input] if isinstance(data.input, str) else data.input
        if not texts:
            raise BadRequestError("input must not be empty")
        answer = await service.infer(
            data.model,
            ClassificationRequest(tuple(texts), top_k=data.top_k),
            cache=cache_directive(request),
        )
        version, result = answer.version, answer.result
        assert isinstance(result, ClassificationResult)
        body = {
            "object": "list",
            "model": version.name,
            "data": [
                {"index": i, "labels": [{"label": lb.label, "score": lb.score} for lb in labels]}
                for i, labels in enumerate(result.labels)
            ],
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
        return Response(body, headers={**model_headers(version), **cache_headers(answer.cache)})

    @get("/plugins")
    async def plugins(self, service: InferenceService) -> dict[str, Any]:
        """Every plugin found: loaded, skipped or failed (with the error text)."""
        return {"plugins": [msgspec.to_builtins(r) for r in service.plugin_records()]}
