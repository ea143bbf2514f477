"""The OpenAI Files and Batch API (``/v1/files``, ``/v1/batches``) over ``core.jobs``.

Each batch line runs through the same translation as the live endpoint (``chat_reply``,
``completion_reply``, ``embedding_reply`` in api/openai.py), so an output line's body is
what a live call would have answered; a refused line's body is its problem+json.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Response, delete, get, post
from litestar.datastructures import UploadFile
from litestar.enums import RequestEncodingType
from litestar.openapi import ResponseSpec
from litestar.params import Body, Parameter
from msgspec import Meta

from modelyard.api.openai import (
    ChatCompletionBody,
    CompletionBody,
    EmbeddingBody,
    WireReply,
    chat_reply,
    chat_request,
    completion_reply,
    completion_requests,
    embedding_reply,
    embedding_request,
)
from modelyard.api.problems import client_detail, problem_body
from modelyard.api.schema import problems
from modelyard.api.security import Caller
from modelyard.core.errors import BadRequestError, ModelyardError
from modelyard.core.jobs import (
    BatchJobs,
    BatchSettings,
    InputLine,
    LineExecutor,
    LineResult,
    known_model,
)
from modelyard.core.limits import apply_limits
from modelyard.core.response_cache import CacheDirective
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, cache_dir_of
from modelyard.core.types import InferenceRequest

__all__ = ["BatchesController", "batch_jobs", "line_executor"]

_BODIES: dict[str, type[Any]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingBody,
}


def _decode(endpoint: str, body: dict[str, Any]) -> Any:
    try:
        data = msgspec.convert(body, _BODIES[endpoint])
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"invalid body: {exc}") from None
    if getattr(data, "stream", False):
        raise BadRequestError("a batch line cannot stream")
    return data


def _requests(data: Any) -> list[InferenceRequest]:
    if isinstance(data, ChatCompletionBody):
        return [chat_request(data)]
    if isinstance(data, CompletionBody):
        return list(completion_requests(data))
    return [embedding_request(data)]


async def _reply(service: InferenceService, data: Any, tenant: str) -> WireReply:
    directive = CacheDirective(tenant=tenant)
    if isinstance(data, ChatCompletionBody):
        return await chat_reply(service, data, directive)
    if isinstance(data, CompletionBody):
        return await completion_reply(service, data, directive)
    return await embedding_reply(service, data, directive)


def line_executor(service: InferenceService) -> LineExecutor:
    """Runs one batch line as its endpoint would; a refusal becomes its problem+json body."""

    async def execute(endpoint: str, body: dict[str, Any], tenant: str) -> LineResult:
        request_id = "req_" + uuid.uuid4().hex
        try:
            reply = await _reply(service, _decode(endpoint, body), tenant)
        except ModelyardError as exc:
            detail = client_detail(exc.status_code, exc.type_slug, exc.detail)
            content, _ = problem_body(
                endpoint, status=exc.status_code, title=exc.title, detail=detail,
                type_slug=exc.type_slug,
            )
            return LineResult(status_code=exc.status_code, body=msgspec.json.decode(content),
                              request_id=request_id)
        return LineResult(status_code=200, body=reply.body, request_id=request_id)

    return execute


def check_body(settings: Settings) -> Any:
    """The create-time check of a line: its body decodes and is within the model's limits."""

    def check(endpoint: str, line: InputLine) -> None:
        for request in _requests(_decode(endpoint, line.body)):
            apply_limits(settings.limits.for_model(line.model), line.model, request)

    return check


class _ServiceModels:
    def __init__(self, service: InferenceService) -> None:
        self._service = service
        self.known = known_model(service.resolve)

    def queue_depth(self, model: str) -> int:
        try:
            batcher = self._service.resolve(model).batcher
        except ModelyardError:
            return 0
        return batcher.depth if batcher is not None else 0


def batch_jobs(settings: Settings, service: InferenceService) -> BatchJobs:
    """The batch jobs of an app or an offline run, under ``[batches] data_dir``."""
    batches: BatchSettings = settings.batches
    data_dir = (Path(batches.data_dir).expanduser() if batches.data_dir
                else cache_dir_of(settings) / "batches")
    return BatchJobs(batches, data_dir, line_executor(service), _ServiceModels(service),
                     check_body=check_body(settings))


# -- wire ----------------------------------------------------------------------------------


def _list(items: list[Any], has_more: bool) -> dict[str, Any]:
    data = [msgspec.to_builtins(i) for i in items]
    return {
        "object": "list", "data": data, "has_more": has_more,
        "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None,
    }


def _problems(*statuses: int, **descriptions: str) -> dict[int, ResponseSpec]:
    """``problems(...)``, with this API's words for a status (``s404="No such file"``)."""
    specs = problems(*statuses)
    for status, spec in specs.items():
        if f"s{status}" in descriptions:
            specs[status] = dataclasses.replace(spec, description=descriptions[f"s{status}"])
    return specs


_NO_FILE = "No such file, or not the caller's (an admin sees every file)"
_NO_BATCH = "No such batch, or not the caller's (an admin sees every batch)"
_BAD_QUERY = "A query parameter is malformed or out of range"

#: The endpoints a batch may target (core.jobs.ENDPOINTS, as a type the schema states).
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
#: Whole hours, 1 to 9999, as ``core.jobs`` reads a completion window (``24h``).
_WINDOW = r"^(?!0+h$)[0-9]{1,4}h$"
CompletionWindow = Annotated[str, Meta(pattern=_WINDOW)]

Limit = Annotated[int, Parameter(ge=1, le=10000, description="At most this many objects")]
After = Annotated[str, Parameter(description="The id after which the page starts; empty: "
                                             "from the first")]


class BatchCreateBody(msgspec.Struct, kw_only=True):
    input_file_id: str
    endpoint: BatchEndpoint
    completion_window: CompletionWindow = "24h"
    metadata: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # the pattern's ``$`` also matches before a final newline in Python, not in the schema
        if not re.fullmatch(_WINDOW.rstrip("$"), self.completion_window):
            raise ValueError(f"completion_window must be hours such as '24h', "
                             f"not {self.completion_window!r}")


@dataclass
class FileUploadForm:
    """``POST /v1/files``: the JSONL file and its purpose."""

    file: UploadFile
    purpose: Literal["batch"]


class BatchesController(Controller):
    path = "/v1"
    tags = ("OpenAI batches",)

    @post("/files", status_code=200, responses=_problems(
        400, 413, 429, s400="The multipart body lacks the file part, or purpose is not batch",
        s413="The file exceeds [batches] max_file_bytes, or the body the server's limit",
        s429="The caller's storage quota is spent; delete files first",
    ))
    async def create_file(
        self,
        data: Annotated[FileUploadForm, Body(media_type=RequestEncodingType.MULTI_PART)],
        batches: BatchJobs,
        principal: Caller,
    ) -> dict[str, Any]:
        """Upload a JSONL file (multipart: ``file``, ``purpose=batch``)."""
        if not isinstance(data.file, UploadFile):
            raise BadRequestError("the multipart body needs a 'file' part")
        content = await data.file.read()
        created = await batches.create_file(principal, data.file.filename, data.purpose, content)
        return msgspec.to_builtins(created)  # type: ignore[no-any-return]

    @get("/files", responses=_problems(400, s400=_BAD_QUERY))
    async def list_files(
        self, batches: BatchJobs, principal: Caller,
        purpose: Annotated[str, Parameter(description="Only files of this purpose; empty: "
                                                      "all")] = "",
        limit: Limit = 10000, after: After = "", order: Literal["asc", "desc"] = "desc",
    ) -> dict[str, Any]:
        """The caller's files (an admin: everyone's), newest first."""
        page = batches.files(principal, purpose=purpose or None, limit=limit,
                             after=after or None, order=order)
        return _list(page.data, page.has_more)

    @get("/files/{file_id:str}", responses=_problems(404, s404=_NO_FILE))
    async def get_file(self, file_id: str, batches: BatchJobs, principal: Caller) -> Any:
        return msgspec.to_builtins(batches.file(principal, file_id))

    @get("/files/{file_id:str}/content", media_type="application/jsonl",
         responses=_problems(404, s404=_NO_FILE))
    async def file_content(
        self, file_id: str, batches: BatchJobs, principal: Caller
    ) -> Response[bytes]:
        """The file's bytes (an output file: one JSON result per line)."""
        content = await batches.file_content(principal, file_id)
        return Response(content, media_type="application/jsonl")

    @delete("/files/{file_id:str}", status_code=200, responses=_problems(
        404, 409, s404=_NO_FILE, s409="The file is the input of a batch still running"))
    async def delete_file(
        self, file_id: str, batches: BatchJobs, principal: Caller
    ) -> dict[str, Any]:
        batches.delete_file(principal, file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    @post("/batches", status_code=200, responses=_problems(
        400, 404, 429,
        s400="The body is malformed, or a line of the input file is (the detail names it)",
        s404="No input file of that id, or not the caller's",
        s429="The caller's quota of unfinished batches is spent",
    ))
    async def create_batch(
        self, data: BatchCreateBody, batches: BatchJobs, principal: Caller
    ) -> Any:
        """Start a batch over an uploaded file; a bad line is refused here, naming it."""
        batches.file(principal, data.input_file_id)  # 404: no such file, as GET /files/{id}
        created = await batches.create_batch(
            principal, input_file_id=data.input_file_id, endpoint=data.endpoint,
            completion_window=data.completion_window, metadata=data.metadata,
        )
        return msgspec.to_builtins(created)

    @get("/batches", responses=_problems(400, s400=_BAD_QUERY))
    async def list_batches(
        self, batches: BatchJobs, principal: Caller, limit: Limit = 20, after: After = "",
    ) -> dict[str, Any]:
        page = batches.batches(principal, limit=limit, after=after or None)
        return _list(page.data, page.has_more)

    @get("/batches/{batch_id:str}", responses=_problems(404, s404=_NO_BATCH))
    async def get_batch(self, batch_id: str, batches: BatchJobs, principal: Caller) -> Any:
        return msgspec.to_builtins(batches.batch(principal, batch_id))

    @post("/batches/{batch_id:str}/cancel", status_code=200, responses=_problems(
        404, 409, s404=_NO_BATCH, s409="The batch has already finished"))
    async def cancel_batch(self, batch_id: str, batches: BatchJobs, principal: Caller) -> Any:
        return msgspec.to_builtins(batches.cancel(principal, batch_id))
