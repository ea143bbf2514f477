"""The ``[cors]`` config section: which browser origins may call the API (none by default)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct, field

__all__ = ["CorsSettings"]

#: ``scheme://host[:port]`` as a browser sends it in ``Origin``, or ``*`` for any origin.
Origin = Annotated[str, Meta(pattern=r"^(\*|https?://[^/\s?#@]+)$")]
#: An HTTP field name (RFC 9110 token), or ``*`` for any.
FieldName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")]
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]


def _default_headers() -> list[str]:
    return ["Authorization", "Content-Type", "Cache-Control", "X-Request-Id"]


def _default_exposed() -> list[str]:
    # What a browser script may read beyond the CORS-safelisted response fields.
    return [
        "X-Request-Id", "X-Model-Name", "X-Model-Version", "X-Cache", "Retry-After",
        "RateLimit", "RateLimit-Policy", "Inference-Header-Content-Length",
    ]


class CorsSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[cors]``: cross-origin calls from browser pages; off while ``allow_origins`` is empty."""

    #: Origins whose pages may call the API, exactly as the browser sends them
    #: (``https://app.example.com``, ``http://localhost:5173``); ``["*"]`` allows any.
    allow_origins: list[Origin] = field(default_factory=list)
    #: Methods a cross-origin request may use.
    allow_methods: list[Method] = field(default_factory=lambda: ["GET", "POST"])
    #: Request fields a cross-origin request may send; ``["*"]`` allows any.
    allow_headers: list[FieldName] = field(default_factory=_default_headers)
    #: Response fields a script may read.
    expose_headers: list[FieldName] = field(default_factory=_default_exposed)
    #: Let pages send cookies or HTTP auth along (``credentials: "include"``); bearer tokens
    #: set by the script do not need it.
    allow_credentials: bool = False
    #: How long a browser may reuse a preflight's answer.
    max_age_s: Annotated[int, Meta(ge=0, le=86_400)] = 600

    def __post_init__(self) -> None:
        if "*" in self.allow_origins and self.allow_credentials:
            # Any page on the web could then act with the user's cookies.
            raise ValueError("allow_credentials = true needs explicit allow_origins, not \"*\"")

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)
