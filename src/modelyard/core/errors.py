"""The one error hierarchy; the API maps it to RFC 9457 problem+json in one place."""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BackendError",
    "BadRequestError",
    "ConfigError",
    "ConflictError",
    "DrainingError",
    "ForbiddenError",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelyardError",
    "NotFoundError",
    "PayloadTooLargeError",
    "QueueFullError",
    "RateLimitedError",
    "ServiceUnavailableError",
    "TimeoutError_",
    "UnauthorizedError",
    "UnprocessableError",
    "UnsupportedTaskError",
]


class ModelyardError(Exception):
    """Base of every error a client may see; carries the HTTP status and a safe message.

    ``detail`` reaches the client: it is a message of ours, never a library's exception
    text, a class name or a file path (those go to the log, next to the request id).
    """

    status_code: ClassVar[int] = 500
    title: ClassVar[str] = "Internal Server Error"
    type_slug: ClassVar[str] = "internal"
    #: Whether this error, raised while a model version serves a request, says the version
    #: failed: its circuit breaker and its canary count it. Client errors (4xx) never count;
    #: admission refusals (a full queue, draining) are 5xx that do not either: shedding load
    #: is not failing.
    counts_as_failure: ClassVar[bool] = True

    def __init__(
        self,
        detail: str,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


class BadRequestError(ModelyardError):
    status_code = 400
    title = "Bad Request"
    type_slug = "bad-request"


class UnsupportedTaskError(BadRequestError):
    type_slug = "unsupported-task"


class UnauthorizedError(ModelyardError):
    status_code = 401
    title = "Unauthorized"
    type_slug = "unauthorized"


class ForbiddenError(ModelyardError):
    status_code = 403
    title = "Forbidden"
    type_slug = "forbidden"


class ModelNotFoundError(ModelyardError):
    status_code = 404
    title = "Model Not Found"
    type_slug = "model-not-found"


class NotFoundError(ModelyardError):
    """Something other than a model (a file, a batch) does not exist or is not the caller's."""

    status_code = 404
    title = "Not Found"
    type_slug = "not-found"


class ConflictError(ModelyardError):
    status_code = 409
    title = "Conflict"
    type_slug = "conflict"


class PayloadTooLargeError(ModelyardError):
    status_code = 413
    title = "Payload Too Large"
    type_slug = "payload-too-large"


class UnprocessableError(ModelyardError):
    status_code = 422
    title = "Unprocessable Content"
    type_slug = "unprocessable"
    counts_as_failure = False  # request limits refuse before any backend is called


class RateLimitedError(ModelyardError):
    status_code = 429
    title = "Too Many Requests"
    type_slug = "rate-limited"
    counts_as_failure = False


class BackendError(ModelyardError):
    """The backend failed while serving a valid request."""

    status_code = 500
    title = "Backend Error"
    type_slug = "backend-error"


class ServiceUnavailableError(ModelyardError):
    status_code = 503
    title = "Service Unavailable"
    type_slug = "unavailable"

    def __init__(self, detail: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.headers.setdefault("Retry-After", str(max(1, round(retry_after))))


class ModelNotReadyError(ServiceUnavailableError):
    type_slug = "model-not-ready"


class QueueFullError(ServiceUnavailableError):
    """A version's batch queue is full: load shed before the backend was asked."""

    counts_as_failure = False


class DrainingError(ServiceUnavailableError):
    """The server is shutting down and takes no new requests."""

    counts_as_failure = False


class TimeoutError_(ModelyardError):  # avoid shadowing the builtin
    status_code = 504
    title = "Gateway Timeout"
    type_slug = "timeout"


class ConfigError(ModelyardError):
    """A configuration file or override is invalid; the message names the path."""

    status_code = 422
    title = "Invalid Configuration"
    type_slug = "invalid-config"


class ModelLoadError(ModelyardError):
    """A model version could not be loaded (bad file, missing runtime, ...)."""

    status_code = 422
    title = "Model Load Failed"
    type_slug = "model-load-failed"
