"""CORS for browser clients: preflights answered and response fields added, per ``[cors]``.

Run by the exchange layer rather than by Litestar's ``CORSConfig``, whose middleware adds
``Access-Control-Allow-Methods``/``-Headers`` to every response that has an ``Origin``, the
allowed ones or not, and answers a refused preflight in plain text. Here an origin that is
not allowed gets no CORS field at all, and a refused preflight is a 403 problem+json.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) is answered
before routing and before the security check: browsers send it without credentials. The
request it announces is then checked like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

from litestar.types import ASGIApp, Message, Receive, Scope, Send

from modelyard.api.problems import PROBLEM_JSON, problem_body
from modelyard.core.cors_settings import CorsSettings

if TYPE_CHECKING:
    from modelyard.core.tracing import RawHeaders

__all__ = ["Cors"]

_ALLOW_ORIGIN = b"access-control-allow-origin"
_VARY = b"vary"
#: What a preflight's answer depends on, for caches between the browser and us.
_PREFLIGHT_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


class Cors:
    """The ``[cors]`` policy: the preflight answerer and the response hook of the exchange."""

    def __init__(self, settings: CorsSettings) -> None:
        self._any_origin = "*" in settings.allow_origins
        self._origins = frozenset(o.lower() for o in settings.allow_origins if o != "*")
        self._methods = frozenset(settings.allow_methods)
        self._any_header = "*" in settings.allow_headers
        self._headers = frozenset(h.lower() for h in settings.allow_headers)
        self._credentials = settings.allow_credentials
        self._allow_methods = ", ".join(sorted(self._methods)).encode()
        self._allow_headers = ", ".join(sorted(settings.allow_headers)).encode()
        self._expose = ", ".join(settings.expose_headers).encode()
        self._max_age = str(settings.max_age_s).encode()

    def allows(self, origin: str) -> bool:
        return self._any_origin or origin.lower() in self._origins

    # -- preflight -----------------------------------------------------------------------

    def preflight(self, headers: RawHeaders) -> ASGIApp | None:
        """The app answering the preflight in ``headers``; None when this OPTIONS is none."""
        origin = method = requested = None
        for name, value in headers:
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-method":
                method = value.decode("latin-1").strip()
            elif name == b"access-control-request-headers":
                requested = value.decode("latin-1")
        if origin is None or method is None:
            return None
        asked = [h.strip().lower() for h in (requested or "").split(",") if h.strip()]
        refusal = self._refusal(origin, method, asked)
        if refusal is not None:
            return _refused(refusal)
        fields = [
            (_ALLOW_ORIGIN, self._origin_value(origin)),
            (b"access-control-allow-methods", self._allow_methods),
            (b"access-control-max-age", self._max_age),
            (_VARY, _PREFLIGHT_VARY),
        ]
        if asked:
            allowed = ", ".join(asked).encode() if self._any_header else self._allow_headers
            fields.append((b"access-control-allow-headers", allowed))
        if self._credentials:
            fields.append((b"access-control-allow-credentials", b"true"))
        return _allowed(fields)

    def _refusal(self, origin: str, method: str, asked: list[str]) -> str | None:
        if not self.allows(origin):
            return f"CORS preflight refused: origin {origin!r} is not allowed"
        if method not in self._methods:
            return f"CORS preflight refused: method {method!r} is not allowed"
        if not self._any_header:
            unknown = [h for h in asked if h not in self._headers]
            if unknown:
                return f"CORS preflight refused: header(s) {', '.join(unknown)} not allowed"
        return None

    def _origin_value(self, origin: str) -> bytes:
        # ``*`` only while no credentials travel: browsers refuse ``*`` with credentials.
        if self._any_origin and not self._credentials:
            return b"*"
        return origin.encode("latin-1")

    # -- actual requests -----------------------------------------------------------------

    def on_response_start(self, scope: Scope, message: Message) -> None:
        """Response hook: the CORS fields on a response to an allowed origin, none otherwise."""
        origin = None
        preflight = False
        for name, value in cast("RawHeaders", scope["headers"]):
            if name == b"origin":
                origin = value.decode("latin-1")
            elif name == b"access-control-request-method":
                preflight = True
        headers = list(cast("Iterable[tuple[bytes, bytes]]", message.get("headers", ())))
        if preflight and scope.get("method") == "OPTIONS":
            return  # answered (or refused) with its own fields above
        if not self._any_origin:
            headers.append((_VARY, b"Origin"))  # the answer differs by origin: tell caches
        if origin is not None and self.allows(origin):
            headers.append((_ALLOW_ORIGIN, self._origin_value(origin)))
            if self._credentials:
                headers.append((b"access-control-allow-credentials", b"true"))
            if self._expose:
                headers.append((b"access-control-expose-headers", self._expose))
        message["headers"] = headers  # type: ignore[typeddict-unknown-key]


def _allowed(fields: list[tuple[bytes, bytes]]) -> ASGIApp:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": fields})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return answer


def _refused(detail: str) -> ASGIApp:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        body, extra = problem_body(
            scope["path"], status=403, title="Forbidden", detail=detail, type_slug="cors",
        )
        headers = [
            (b"content-type", PROBLEM_JSON.encode()),
            (b"content-length", str(len(body)).encode()),
            (_VARY, _PREFLIGHT_VARY),
            *((k.lower().encode(), v.encode()) for k, v in extra.items()),
        ]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return answer
