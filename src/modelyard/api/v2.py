"""Open Inference Protocol v2 (KServe / Triton): health, metadata, infer, repository."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post

from modelyard._version import __version__
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


class V2Input(msgspec.Struct):
    name: str
    datatype: str
    shape: list[int]
    data: Any = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class V2Output(msgspec.Struct):
    name: str
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


class V2InferBody(msgspec.Struct):
    inputs: list[V2Input]
    id: str | None = None
    outputs: list[V2Output] | None = None
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)


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
    head: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor in outputs:
        item: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        requested = wanted.get(tensor.name) if body.outputs else None
        as_binary = binary_all or bool(requested and requested.parameters.get("binary_data"))
        if as_binary:
            blob = encode_binary_tensor(tensor)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = json_data(tensor)
        head.append(item)
    payload = {"model_name": version.name, "model_version": version.version, "outputs": head}
    if body.id is not None:
        payload["id"] = body.id
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

    @get("/health/ready")
    async def ready(self, service: InferenceService) -> dict[str, bool]:
        """200 once every required model has a healthy active version."""
        readiness = service.readiness()
        if not readiness.ready:
            raise ModelNotReadyError(f"not ready ({readiness.reason})", retry_after=5)
        return {"ready": True}

    @get(["/models/{name:str}", "/models/{name:str}/versions/{version:str}"])
    async def model_metadata(
        self, name: str, service: InferenceService, version: str | None = None
    ) -> dict[str, Any]:
        return _metadata(service.model_metadata(name, version))

    @get(["/models/{name:str}/ready", "/models/{name:str}/versions/{version:str}/ready"])
    async def model_ready(
        self, name: str, service: InferenceService, version: str | None = None
    ) -> dict[str, Any]:
        found = service.resolve(name, version)
        return {"name": name, "version": found.version, "ready": True}

    @post(
        ["/models/{name:str}/infer", "/models/{name:str}/versions/{version:str}/infer"],
        status_code=200,
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

    @post("/repository/models/{name:str}/load", status_code=200)
    async def load(self, name: str, service: InferenceService) -> dict[str, Any]:
        await service.load_model(name)
        return {"name": name, "loaded": True}

    @post("/repository/models/{name:str}/unload", status_code=200)
    async def unload(self, name: str, service: InferenceService) -> dict[str, Any]:
        await service.unload_model(name)
        return {"name": name, "unloaded": True}
