"""Small translations every protocol controller shares: headers, cache directive, sampling."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
from litestar import Request

from modelyard.core.errors import BadRequestError
from modelyard.core.registry import ModelVersion
from modelyard.core.response_cache import CacheDirective, CacheStatus
from modelyard.core.types import GenerationParams

__all__ = ["cache_directive", "cache_headers", "generation_params", "model_headers"]

#: Sampling fields a request may set; anything else in the mapping is ignored.
_SAMPLING = frozenset({
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias",
})


def model_headers(version: ModelVersion) -> dict[str, str]:
    """Every model response says which version answered."""
    return {"X-Model-Name": version.name, "X-Model-Version": version.version}


def cache_directive(request: Request[Any, Any, Any]) -> CacheDirective | None:
    """``Cache-Control: no-store`` skips the cache; ``no-cache`` bypasses the read and
    refreshes the entry."""
    directives = {p.strip().lower() for p in request.headers.get("cache-control", "").split(",")}
    if "no-store" in directives:
        return None
    user = request.scope.get("user")
    return CacheDirective(tenant=getattr(user, "tenant", "") or "",
                          refresh="no-cache" in directives)


def cache_headers(status: CacheStatus) -> dict[str, str]:
    return {"X-Cache": status.value}


def generation_params(raw: Mapping[str, Any]) -> GenerationParams:
    """Sampling parameters from a request (OpenAI body fields or v2 ``parameters``); 400 when
    one is out of range. ``stop`` may be one string; ``logit_bias`` keys are token ids."""
    fields = {k: v for k, v in raw.items() if k in _SAMPLING and v is not None}
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    bias = fields.get("logit_bias")
    if bias:
        try:
            fields["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (ValueError, TypeError, AttributeError):
            raise BadRequestError("logit_bias keys must be token ids") from None
    try:
        return msgspec.convert(fields, GenerationParams)
    except msgspec.ValidationError as exc:
        raise BadRequestError(f"invalid sampling parameter: {exc}") from None
