"""The one place errors become responses: RFC 9457 problem+json, never a traceback.

A client error (4xx) says what to fix. A server failure (500 and the like) gets a stable
message and the request id: the exception's own text may name a library's class, quote its
message or hold a file path, so it goes to the log (stamped with the same request id) and
never into the body. 503 and 504 keep their detail: modelyard writes those itself (queue full,
breaker open, not ready, timed out) and the client needs it to know when to retry.

An error caused by a model version (the pipeline chose it, then it failed, timed out or
refused) carries ``X-Model-Name`` and ``X-Model-Version`` like a success does: the request's
:class:`~modelyard.core.logs.RequestInfo` recorded the version when it was picked.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, SerializationException, ValidationException

from modelyard.core.errors import ModelyardError
from modelyard.core.logs import current_request

__all__ = [
    "PROBLEM_JSON",
    "client_detail",
    "error_is_text",
    "exception_handlers",
    "problem_body",
    "problem_response",
]

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://modelyard.dev/problems/"
log = logging.getLogger(__name__)

_HTTP_TITLES = {
    400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
    500: "Internal Server Error", 503: "Service Unavailable", 504: "Gateway Timeout",
}
#: Server-side statuses whose detail modelyard writes itself, for the client to act on.
_OWN_DETAIL = frozenset({503, 504})
_IN_THE_LOG = "the server log has the detail under this request id"
_INTERNAL_DETAIL = f"the server hit an unexpected error; {_IN_THE_LOG}"


def error_is_text(path: str) -> bool:
    """Whether a problem at ``path`` carries ``error`` as a string (tritonclient, ``/v2``)
    rather than the object the OpenAI SDK reads (everywhere else). The OpenAPI document
    (api/schema.py) follows the same rule."""
    return path.startswith("/v2")


def _detail_is_safe(status: int) -> bool:
    return status < 500 or status in _OWN_DETAIL


def client_detail(status: int, type_slug: str, detail: str) -> str:
    """What a client may read: ``detail`` for its own errors, a stable text for the server's.

    A backend failure names the model the request was routed to (the request's context
    recorded it), nothing more.
    """
    if _detail_is_safe(status):
        return detail
    info = current_request()
    if type_slug == "backend-error" and info is not None and info.model:
        return f"model {info.model!r} failed to answer; {_IN_THE_LOG}"
    return _INTERNAL_DETAIL


def problem_body(
    path: str,
    *,
    status: int,
    title: str,
    detail: str,
    type_slug: str,
    extra: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The problem+json body for ``path`` and the headers that come with it.

    Used by the exception handlers and by the exchange layer, which answers a few requests
    (a drain past its grace period) outside any handler.
    """
    body: dict[str, Any] = {
        "type": TYPE_BASE + type_slug,
        "title": title,
        "status": status,
        "detail": detail,
        "instance": path,
    }
    headers: dict[str, str] = {}
    info = current_request()
    if info is not None:
        body["request_id"] = info.request_id
        if info.model:  # a version was chosen for this request: say which one failed
            headers["X-Model-Name"] = info.model
            headers["X-Model-Version"] = info.version
    if extra:
        body.update(extra)
    # Protocol clients read an ``error`` member: tritonclient a string, the openai SDK an object.
    if error_is_text(path):
        body["error"] = detail
    else:
        body["error"] = {"message": detail, "type": type_slug, "code": status}
    return msgspec.json.encode(body), headers


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
    content, model_headers = problem_body(
        request.url.path, status=status, title=title, detail=detail, type_slug=type_slug,
        extra=extra,
    )
    return Response(
        content=content,
        status_code=status,
        media_type=PROBLEM_JSON,
        headers={**model_headers, **(headers or {})},
    )


def _modelyard_error(request: Request[Any, Any, Any], exc: ModelyardError) -> Response[bytes]:
    status = exc.status_code
    if _detail_is_safe(status):
        detail, extra = exc.detail, exc.extra
    else:  # the detail may quote a library or a path: the log has it, the client a stable text
        log.error("%s %s -> %d %s: %s", request.method, request.url.path, status,
                  exc.type_slug, exc.detail)
        detail, extra = client_detail(status, exc.type_slug, exc.detail), {}
    return problem_response(
        request, status=status, title=exc.title, detail=detail,
        type_slug=exc.type_slug, headers=exc.headers, extra=extra,
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
        detail = client_detail(status, slug, detail)
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
        detail=_INTERNAL_DETAIL,
        type_slug="internal",
    )


exception_handlers: dict[type[Exception] | int, Any] = {
    ModelyardError: _modelyard_error,
    HTTPException: _http_exception,
    Exception: _unexpected,
}
