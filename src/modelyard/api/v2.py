"""Open Inference Protocol v2 (KServe / Triton): health, metadata, infer, repository."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, get_args

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.openapi import ResponseSpec
from msgspec import UNSET, Meta, UnsetType

from modelyard._version import __version__
from modelyard.api.schema import TensorOperation, problems
from modelyard.api.security import Caller
from modelyard.api.tensors import (
    decode_binary_tensor,
    encode_binary_tensor,
    flatten,
    json_data,
    validate_tensor,
)
from modelyard.api.wire import cache_directive, cache_headers, generation_params, model_headers
from modelyard.core.errors import BadRequestError, ModelNotReadyError
from modelyard.core.registry import ModelVersion
from modelyard.core.service import InferenceService
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Task,
    Tensor,
    TensorRequest,
    TensorResult,
    TensorSpec,
)
from modelyard.core.views import IndexRow, ModelMetadata

__all__ = ["V2Controller"]

HEADER_LENGTH = "inference-header-content-length"


#: The tensor datatypes of the protocol (``core.types.V2_DATATYPES``, which a test keeps equal).
V2Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]


class V2Input(msgspec.Struct):
    # The schema names the datatypes and non-negative dimensions; the decoder takes any, so
    # that the refusal names the tensor (api/tensors.py).
    name: str
    datatype: Annotated[str, Meta(extra_json_schema={"enum": sorted(get_args(V2Datatype))})]
    shape: list[Annotated[int, Meta(extra_json_schema={"minimum": 0})]]
    #: Nested or flat, row-major; absent when ``parameters.binary_data_size`` says the tensor
    #: follows the JSON in binary.
    data: Any = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class V2Output(msgspec.Struct):
    name: str
    #: ``binary_data: true`` asks for this output in binary.
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class V2InferBody(msgspec.Struct):
    """An inference request (Open Inference Protocol v2)."""

    inputs: Annotated[list[V2Input], Meta(min_length=1)]
    id: str | None = None
    #: The outputs to return (all of them when absent).
    outputs: list[V2Output] | None = None
    #: Sampling parameters for text models; ``binary_data_output: true`` asks for every
    #: output in binary.
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class V2OutputTensor(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    datatype: V2Datatype
    shape: list[int]
    #: Flat, row-major; absent when the tensor follows the JSON in binary.
    data: list[Any] | UnsetType = UNSET
    #: ``binary_data_size`` of a binary output.
    parameters: dict[str, Any] | UnsetType = UNSET


class V2InferResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An inference answer (Open Inference Protocol v2)."""

    model_name: str
    model_version: str
    #: The request's ``id``, when it had one.
    id: str | UnsetType = UNSET
    outputs: list[V2OutputTensor]


@dataclass
class _InferOperation(TensorOperation):
    body: ClassVar[type[msgspec.Struct]] = V2InferBody
    examples: ClassVar[dict[str, Any]] = {
        "tensor": {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2],
                               "data": [[1.0, 2.0]]}]},
        "text": {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                             "data": ["Hello"]}], "parameters": {"max_tokens": 16}},
    }


_TEXT_IN = TensorSpec("text", "BYTES", (-1,))
_GEN_IN = TensorSpec("text_input", "BYTES", (1,))
_GEN_OUT = TensorSpec("text_output", "BYTES", (1,))


def task_io(meta: ModelMetadata) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """How a model's task looks as v2 tensors."""
    task = meta.task
    if task == Task.EMBEDDINGS:
        return [_TEXT_IN], [TensorSpec("embedding", "FP32", (-1, -1))]
    if task == Task.CLASSIFICATION:
        return [_TEXT_IN], [TensorSpec("label", "BYTES", (-1,)), TensorSpec("score", "FP32", (-1,))]
    if task in (Task.CHAT, Task.COMPLETION):
        return [_GEN_IN], [_GEN_OUT]
    return meta.info.inputs, meta.info.outputs


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _metadata(meta: ModelMetadata) -> dict[str, Any]:
    inputs, outputs = task_io(meta)
    parameters = {
        "task": meta.task.value if meta.task else None,
        "backend": meta.backend,
        "state": meta.state,
        "active_version": meta.active_version,
        "breaker": meta.breaker,
        **meta.info.parameters,
    }
    if meta.alias_of is not None:
        parameters["alias_of"] = meta.alias_of
    return {
        "name": meta.name,
        "versions": meta.versions,
        "platform": meta.info.platform or meta.backend,
        "inputs": [_spec_json(s) for s in inputs],
        "outputs": [_spec_json(s) for s in outputs],
        "parameters": parameters,
    }


def _parse_body(raw: bytes, header_length: str | None) -> tuple[V2InferBody, bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequestError("Inference-Header-Content-Length must be an integer") from None
        if not 0 < n <= len(raw):
            raise BadRequestError("Inference-Header-Content-Length exceeds the body")
        head, binary = raw[:n], raw[n:]
    else:
        head, binary = raw, b""
    try:
        return msgspec.json.decode(head, type=V2InferBody), binary
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"invalid inference request: {exc}") from None
    except msgspec.DecodeError:
        raise BadRequestError("malformed JSON in inference request") from None


def _tensors(body: V2InferBody, binary: bytes) -> list[Tensor]:
    tensors, offset = [], 0
    for item in body.inputs:
        size = item.parameters.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise BadRequestError(f"tensor {item.name!r}: binary_data_size exceeds the body")
            blob = binary[offset : offset + size]
            data = decode_binary_tensor(item.name, item.datatype, item.shape, blob)
            offset += size
        else:
            if item.data is None:
                raise BadRequestError(f"tensor {item.name!r} has no data")
            data = validate_tensor(
                item.name, item.datatype, item.shape, flatten(item.data, item.name)
            )
        tensors.append(Tensor(item.name, item.datatype, tuple(item.shape), data))
    if offset != len(binary):
        raise BadRequestError("binary data left over after the last input")
    return tensors


def _texts(tensors: list[Tensor], name: str) -> tuple[str, ...]:
    for t in tensors:
        if t.name == name:
            if t.datatype != "BYTES":
                raise BadRequestError(f"tensor {name!r} must be BYTES")
            try:
                return tuple(x.decode() for x in t.data)
            except UnicodeDecodeError:
                raise BadRequestError(f"tensor {name!r} is not valid UTF-8") from None
    raise BadRequestError(f"input tensor {name!r} is missing")


def to_request(task: Task | None, body: V2InferBody, tensors: list[Tensor]) -> InferenceRequest:
    """Translate v2 tensors into the core request for the model's task."""
    if task == Task.EMBEDDINGS:
        return EmbeddingRequest(_texts(tensors, "text"))
    if task == Task.CLASSIFICATION:
        return ClassificationRequest(_texts(tensors, "text"))
    if task in (Task.CHAT, Task.COMPLETION):
        texts = _texts(tensors, "text_input")
        if len(texts) != 1:
            raise BadRequestError("tensor 'text_input' must hold exactly one prompt")
        params = generation_params(body.parameters)
        if task == Task.CHAT:
            return ChatRequest((ChatMessage("user", texts[0]),), params)
        return CompletionRequest(texts[0], params)
    outputs = tuple(o.name for o in body.outputs) if body.outputs else None
    return TensorRequest(tuple(tensors), outputs)


def to_tensors(result: InferenceResult) -> list[Tensor]:
    if isinstance(result, TensorResult):
        return result.outputs
    if isinstance(result, EmbeddingResult):
        rows = len(result.embeddings)
        dim = len(result.embeddings[0]) if rows else 0
        flat = [x for row in result.embeddings for x in row]
        return [Tensor("embedding", "FP32", (rows, dim), flat)]
    if isinstance(result, ClassificationResult):
        best = [labels[0] for labels in result.labels]
        return [
            Tensor("label", "BYTES", (len(best),), [b.label.encode() for b in best]),
            Tensor("score", "FP32", (len(best),), [b.score for b in best]),
        ]
    assert isinstance(result, GenerationResult)
    return [Tensor("text_output", "BYTES", (1,), [result.text.encode()])]


def _respond(version: ModelVersion, body: V2InferBody, outputs: list[Tensor]) -> Response[bytes]:
    if body.outputs:
        wanted = {o.name: o for o in body.outputs}
        unknown = set(wanted) - {t.name for t in outputs}
        if unknown:
            raise BadRequestError(f"unknown output tensor(s): {', '.join(sorted(unknown))}")
        outputs = [t for t in outputs if t.name in wanted]
    binary_all = bool(body.parameters.get("binary_data_output"))
    head: list[V2OutputTensor] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        item = V2OutputTensor(
            name=tensor.name, datatype=tensor.datatype,  # type: ignore[arg-type]
            shape=list(tensor.shape),
        )
        requested = wanted.get(tensor.name) if body.outputs else None
        as_binary = binary_all or bool(requested and requested.parameters.get("binary_data"))
        if as_binary:
            blob = encode_binary_tensor(tensor)
            item.parameters = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item.data = json_data(tensor)
        head.append(item)
    payload = V2InferResponse(
        model_name=version.name, model_version=version.version, outputs=head,
        id=body.id if body.id is not None else UNSET,
    )
    encoded = msgspec.json.encode(payload)
    headers = model_headers(version)
    if blobs:
        headers["Inference-Header-Content-Length"] = str(len(encoded))
        return Response(
            encoded + b"".join(blobs), media_type="application/octet-stream", headers=headers
        )
    return Response(encoded, media_type="application/json", headers=headers)


class V2Controller(Controller):
    path = "/v2"
    tags = ("Open Inference Protocol v2",)

    @get("")
    async def server_metadata(self) -> dict[str, Any]:
        return {
            "name": "modelyard",
            "version": __version__,
            "extensions": ["model_repository", "binary_tensor_data"],
        }

    @get("/health/live")
    async def live(self) -> dict[str, bool]:
        """200 whenever the event loop answers."""
        return {"live": True}

    @get("/health/ready", responses=problems(503))
    async def ready(self, service: InferenceService) -> dict[str, bool]:
        """200 once every required model has a healthy active version."""
        readiness = service.readiness()
        if not readiness.ready:
            raise ModelNotReadyError(f"not ready ({readiness.reason})", retry_after=5)
        return {"ready": True}

    @get(["/models/{name:str}", "/models/{name:str}/versions/{version:str}"],
         responses=problems(404))
    async def model_metadata(
        self, name: str, service: InferenceService, version: str | None = None
    ) -> dict[str, Any]:
        return _metadata(service.model_metadata(name, version))

    @get(["/models/{name:str}/ready", "/models/{name:str}/versions/{version:str}/ready"],
         responses=problems(404))
    async def model_ready(
        self, name: str, service: InferenceService, version: str | None = None
    ) -> dict[str, Any]:
        found = service.resolve(name, version)
        return {"name": name, "version": found.version, "ready": True}

    @post(
        ["/models/{name:str}/infer", "/models/{name:str}/versions/{version:str}/infer"],
        status_code=200,
        responses={
            200: ResponseSpec(V2InferResponse, description="The outputs", generate_examples=False),
            **problems(400, 404, 408, 413, 422, 504),
        },
        operation_class=_InferOperation,
    )
    async def infer(
        self,
        name: str,
        request: Request[Any, Any, Any],
        service: InferenceService,
        version: str | None = None,
    ) -> Response[bytes]:
        """Infer with JSON tensors or the binary tensor data extension."""
        body, binary = _parse_body(await request.body(), request.headers.get(HEADER_LENGTH))
        core_request = to_request(service.task_of(name, version), body, _tensors(body, binary))
        answer = await service.infer(
            name, core_request, version=version, cache=cache_directive(request)
        )
        response = _respond(answer.version, body, to_tensors(answer.result))
        response.headers.update(cache_headers(answer.cache))
        return response

    @post("/repository/index", status_code=200)
    async def repository_index(
        self, service: InferenceService, principal: Caller
    ) -> list[IndexRow]:
        return service.repository_index(principal)

    @get("/repository/index", name="repository_index_get")
    async def repository_index_get(
        self, service: InferenceService, principal: Caller
    ) -> list[IndexRow]:
        return service.repository_index(principal)

    @post("/repository/models/{name:str}/load", status_code=200, responses=problems(404, 409))
    async def load(self, name: str, service: InferenceService) -> dict[str, Any]:
        await service.load_model(name)
        return {"name": name, "loaded": True}

    @post("/repository/models/{name:str}/unload", status_code=200,
          responses=problems(404, 409))
    async def unload(self, name: str, service: InferenceService) -> dict[str, Any]:
        await service.unload_model(name)
        return {"name": name, "unloaded": True}
