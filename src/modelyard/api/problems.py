"""The one place errors become responses: RFC 9457 problem+json, never a traceback."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from modelyard.core.errors import ModelyardError

__all__ = ["PROBLEM_JSON", "exception_handlers", "problem_response"]

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://modelyard.dev/problems/"
log = logging.getLogger(__name__)

_HTTP_TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
}


def problem_response(
    request: Request[Any, Any, Any],
    *,
    status: int,
    title: str,
    detail: str,
    type_slug: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response[bytes]:
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": request.url.path,
    }
    if extra:
        body.update(extra)
    # Protocol clients read an ``error`` member: tritonclient a string, the openai SDK an object.
    if request.url.path.startswith("/v2"):
        body["error"] = detail
    else:
        body["error"] = {"message": detail, "type": type_slug, "code": status}
    return Response(
        content=msgspec.json.encode(body),
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=headers or {},
    )


def _modelyard_error(request: Request[Any, Any, Any], exc: ModelyardError) -> Response[bytes]:
    if exc.status_code >= 500 and exc.status_code not in (503, 504):
        log.error("%s %s -> %d: %s", request.method, request.url.path, exc.status_code, exc.detail)
    return problem_response(
        request, status=exc.status_code, title=exc.title, detail=exc.detail,
        type_slug=exc.type_slug, headers=exc.headers, extra=exc.extra,
    )


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    extra: dict[str, Any] = {}
    detail = exc.detail or _HTTP_TITLES.get(status, "Error")
    slug = _HTTP_TITLES.get(status, "error").lower().replace(" ", "-")
    if isinstance(exc, ValidationException):
        slug = "validation"
        errors = exc.extra if isinstance(exc.extra, list) else []
        if errors:
            extra["errors"] = [
                {
                    "message": e.get("message", ""),
                    "key": e.get("key", ""),
                    "source": e.get("source", ""),
                }
                for e in errors
                if isinstance(e, dict)
            ]
            detail = (
                "; ".join(
                    f"{e['key']}: {e['message']}" if e["key"] else e["message"]
                    for e in extra["errors"]
                )
                or detail
            )
    if isinstance(exc.__cause__, SerializationException):
        # Litestar passes on msgspec's bare text ("Input data was truncated"); say what it is.
        slug = "malformed-json"
        detail = f"malformed JSON in request body: {exc.detail}"
    if status == 413:
        detail = "request body exceeds the server's limit"
    if status >= 500:
        log.error("%s %s -> %d: %s", request.method, request.url.path, status, detail)
    headers = dict(exc.headers or {})
    return problem_response(
        request,
        status=status,
        title=_HTTP_TITLES.get(status, "Error"),
        detail=detail,
        type_slug=slug,
        headers=headers,
        extra=extra,
    )


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem_response(
        request,
        status=500,
        title="Internal Server Error",
        detail="the server hit an unexpected error; it has been logged",
        type_slug="internal",
    )


exception_handlers: dict[type[Exception] | int, Any] = {
    ModelyardError: _modelyard_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
