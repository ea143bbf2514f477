"""Open Inference Protocol v2 (KServe / Triton): health, metadata, infer, repository."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, get, post

from modelyard import __version__
from modelyard.api.security import visible
from modelyard.api.tensors import (
    decode_binary_tensor,
    encode_binary_tensor,
    flatten,
    json_data,
    validate_tensor,
)
from modelyard.api.wire import cache_directive, cache_headers, model_headers
from modelyard.core.errors import BadRequestError, ModelNotReadyError
from modelyard.core.registry import ModelEntry, ModelVersion, VersionState
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
    InferenceRequest,
    InferenceResult,
    Task,
    Tensor,
    TensorRequest,
    TensorResult,
    TensorSpec,
)

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


def task_io(version: ModelVersion) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """How a version's task looks as v2 tensors."""
    task = version.task
    if task == Task.EMBEDDINGS:
        return [_TEXT_IN], [TensorSpec("embedding", "FP32", (-1, -1))]
    if task == Task.CLASSIFICATION:
        return [_TEXT_IN], [TensorSpec("label", "BYTES", (-1,)), TensorSpec("score", "FP32", (-1,))]
    if task in (Task.CHAT, Task.COMPLETION):
        return [_GEN_IN], [_GEN_OUT]
    if version.backend is not None and version.serving:
        info = version.backend.info()
        return info.inputs, info.outputs
    return [], []


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _metadata(entry: ModelEntry, version: ModelVersion) -> dict[str, Any]:
    inputs, outputs = task_io(version)
    info = version.backend.info() if version.backend is not None and version.serving else None
    parameters = {
        "task": version.task.value if version.task else None,
        "backend": version.spec.backend.name,
        "state": version.state.value if version.state else None,
        "active_version": entry.active_version,
        "breaker": version.breaker.snapshot(),
        **(info.parameters if info else {}),
    }
    return {
        "name": entry.name,
        "versions": list(entry.versions),
        "platform": (info.platform if info else "") or version.spec.backend.name,
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
            data = decode_binary_tensor(item.name, item.datatype, item.shape, binary[offset: offset + size])
            offset += size
        else:
            if item.data is None:
                raise BadRequestError(f"tensor {item.name!r} has no data")
            data = validate_tensor(item.name, item.datatype, item.shape, flatten(item.data))
        tensors.append(Tensor(item.name, item.datatype, tuple(item.shape), data))
    if offset != len(binary):
        raise BadRequestError("binary data left over after the last input")
    return tensors


def _generation_params(parameters: dict[str, Any]) -> GenerationParams:
    keys = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}
    raw = {k: v for k, v in parameters.items() if k in keys}
    if isinstance(raw.get("stop"), str):
        raw["stop"] = [raw["stop"]]
    try:
        return msgspec.convert(raw, GenerationParams)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"invalid parameter: {exc}") from None


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


def to_request(version: ModelVersion, body: V2InferBody, tensors: list[Tensor]) -> InferenceRequest:
    """Translate v2 tensors into the core request for the version's task."""
    task = version.task
    if task == Task.EMBEDDINGS:
        return EmbeddingRequest(_texts(tensors, "text"))
    if task == Task.CLASSIFICATION:
        return ClassificationRequest(_texts(tensors, "text"))
    if task in (Task.CHAT, Task.COMPLETION):
        texts = _texts(tensors, "text_input")
        if len(texts) != 1:
            raise BadRequestError("tensor 'text_input' must hold exactly one prompt")
        params = _generation_params(body.parameters)
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


def _respond(
    version: ModelVersion, body: V2InferBody, outputs: list[Tensor]
) -> Response[bytes]:
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
        item: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype,
                                "shape": list(tensor.shape)}
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
        return Response(encoded + b"".join(blobs), media_type="application/octet-stream",
                        headers=headers)
    return Response(encoded, media_type="application/json", headers=headers)


def _index_state(version: ModelVersion) -> tuple[str, str]:
    state = version.state
    if version.serving:
        return "READY", ""
    if state == VersionState.LOADING:
        return "LOADING", version.phase
    return "UNAVAILABLE", version.error or (state.value if state else "")


class V2Controller(Controller):
    path = "/v2"
    tags = ("Open Inference Protocol v2",)

    @get("")
    async def server_metadata(self) -> dict[str, Any]:
        return {"name": "modelyard", "version": __version__,
                "extensions": ["model_repository", "binary_tensor_data"]}

    @get("/health/live")
    async def live(self) -> dict[str, bool]:
        """200 whenever the event loop answers."""
        return {"live": True}

    @get("/health/ready")
    async def ready(self, service: InferenceService) -> dict[str, bool]:
        """200 once every required model has a healthy active version."""
        if not service.ready():
            waiting = [e.name for e in service.registry if e.required and
                       (e.active is None or not e.active.serving)]
            detail = "draining" if service.draining else f"waiting for: {', '.join(waiting)}"
            raise ModelNotReadyError(f"not ready ({detail})", retry_after=5)
        return {"ready": True}

    @get(["/models/{name:str}", "/models/{name:str}/versions/{version:str}"])
    async def model_metadata(
        self, name: str, service: InferenceService, version: str | None = None
    ) -> dict[str, Any]:
        chain = service.aliases.get(name)
        if chain is not None and version is None:
            found = service.resolve(name)
            meta = _metadata(service.registry.entry(found.name), found)
            meta["parameters"]["alias_of"] = [str(t) for t in chain.targets]
            return {**meta, "name": name, "versions": []}
        entry = service.registry.entry(name)
        found = service.registry.get(name, version) if version else (entry.active or _first(entry))
        return _metadata(entry, found)

    @get(["/models/{name:str}/ready", "/models/{name:str}/versions/{version:str}/ready"])
    async def model_ready(
        self, name: str, service: InferenceService, version: str | None = None
    ) -> dict[str, Any]:
        found = service.resolve(name) if version is None else service.registry.get(name, version)
        return {"name": name, "version": found.version, "ready": True}

    @post(["/models/{name:str}/infer", "/models/{name:str}/versions/{version:str}/infer"],
          status_code=200)
    async def infer(
        self, name: str, request: Request[Any, Any, Any], service: InferenceService,
        version: str | None = None,
    ) -> Response[bytes]:
        """Infer with JSON tensors or the binary tensor data extension."""
        body, binary = _parse_body(await request.body(), request.headers.get(HEADER_LENGTH))
        target = service.resolve(name) if version is None else service.registry.get(name, version)
        core_request = to_request(target, body, _tensors(body, binary))
        directive = cache_directive(request)
        answered, result = await service.infer(name, core_request, version=version, cache=directive)
        response = _respond(answered, body, to_tensors(result))
        response.headers.update(cache_headers(directive))
        return response

    @post("/repository/index", status_code=200)
    async def repository_index(
        self, service: InferenceService, request: Request[Any, Any, Any]
    ) -> list[dict[str, Any]]:
        return _index(service, request)

    @get("/repository/index", name="repository_index_get")
    async def repository_index_get(
        self, service: InferenceService, request: Request[Any, Any, Any]
    ) -> list[dict[str, Any]]:
        return _index(service, request)

    @post("/repository/models/{name:str}/load", status_code=200)
    async def load(self, name: str, service: InferenceService) -> dict[str, Any]:
        entry = await service.load_model(name)
        failed = [v for v in entry.versions.values() if v.state == VersionState.FAILED]
        if failed and not any(v.serving for v in entry.versions.values()):
            raise ModelNotReadyError(f"model {name!r} failed to load: {failed[0].error}")
        return {"name": name, "loaded": True}

    @post("/repository/models/{name:str}/unload", status_code=200)
    async def unload(self, name: str, service: InferenceService) -> dict[str, Any]:
        await service.unload_model(name)
        return {"name": name, "unloaded": True}


def _first(entry: ModelEntry) -> ModelVersion:
    return next(iter(entry.versions.values()))


def _index(service: InferenceService, request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
    rows = []
    for entry in service.registry:
        if not visible(request, entry.name):
            continue  # a model outside the caller's scopes is not listed
        for version in entry.versions.values():
            state, reason = _index_state(version)
            rows.append({"name": entry.name, "version": version.version, "state": state,
                         "reason": reason})
    return rows

