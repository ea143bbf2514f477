"""The objects batch jobs keep: files, batches (OpenAI's shapes), input lines, line results."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import Any

from msgspec import Struct, field

__all__ = [
    "ENDPOINTS",
    "Batch",
    "BatchError",
    "BatchErrors",
    "BatchStatus",
    "FileObject",
    "InputLine",
    "LineExecutor",
    "LineResult",
    "RequestCounts",
]

#: The endpoints a batch may target.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED}
)


class FileObject(Struct, kw_only=True):
    """An uploaded file or a batch's output, as ``GET /v1/files/{id}`` shows it."""

    id: str
    object: str = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class RequestCounts(Struct, kw_only=True):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(Struct, kw_only=True):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(Struct, kw_only=True):
    object: str = "list"
    data: list[BatchError] = field(default_factory=list)


class Batch(Struct, kw_only=True):
    """One batch job, in the OpenAI Batch object's shape."""

    id: str
    object: str = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


class InputLine(Struct, kw_only=True):
    """One request of an input file (``{"custom_id", "method", "url", "body"}``)."""

    custom_id: str
    method: str
    url: str
    body: dict[str, Any]

    @property
    def model(self) -> str:
        return str(self.body.get("model", ""))


class LineResult(Struct, kw_only=True):
    """What the endpoint answered one line: the status and the body a live call would get."""

    status_code: int
    body: Any
    request_id: str = ""

    @property
    def retryable(self) -> bool:
        """Worth another try: the server was busy or failed (5xx, 429), not the request."""
        return self.status_code >= 500 or self.status_code == 429


#: Runs one line's body against an endpoint (``"/v1/chat/completions"``, body, the caller's
#: cache tenant) and returns the answer; it never raises for a refused or failed request.
LineExecutor = Callable[[str, dict[str, Any], str], Awaitable[LineResult]]
