"""What the core asks of a response cache; ``modelyard.cache`` provides the implementation."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from msgspec import Struct

from modelyard.core.types import InferenceRequest, InferenceResult, StreamChunk

__all__ = ["CacheDirective", "CacheStatus", "ResponseCache"]

Run = Callable[[], Awaitable[InferenceResult]]
StartStream = Callable[[], Awaitable[AsyncIterator[StreamChunk]]]


class CacheDirective(Struct, frozen=True, kw_only=True):
    """What one request asks of the cache (the ``Cache-Control`` header and the caller)."""

    #: The caller's tenant: part of the key, so tenants never share entries.
    tenant: str = ""
    #: ``Cache-Control: no-cache``: do not read the cache; store the fresh answer.
    refresh: bool = False


class CacheStatus(enum.StrEnum):
    """How the cache took part in one answer (the ``X-Cache`` header)."""

    HIT = "HIT"
    MISS = "MISS"
    #: Not read: not cacheable, refreshed, ``no-store``, or no cache configured.
    BYPASS = "BYPASS"


class ResponseCache(Protocol):
    """The response cache in front of the backends, as the inference pipeline uses it."""

    def key_for(
        self, request: InferenceRequest, *, model: str, version: str, weights_digest: str,
        backend: str, backend_version: str, tenant: str,
    ) -> bytes | None:
        """The key of ``request`` as served by that exact version; None if not cacheable."""

    def weights_digest(self, path: Path) -> str:
        """A digest of the weight files at ``path``, so new weights never hit old answers."""

    async def lookup_or_run(
        self, key: bytes, run: Run, *, refresh: bool = False
    ) -> tuple[InferenceResult, str]:
        """The cached answer or ``run()``'s; the outcome is ``"hit"`` or ``"miss"``."""

    async def stream_through(
        self, key: bytes, start: StartStream, *, refresh: bool = False
    ) -> tuple[AsyncIterator[StreamChunk], str]:
        """A cached generation replayed, or the backend's stream stored at its end."""

    async def purge(self, model: str | None = None) -> None:
        """Forget one model's answers, or all of them."""

    def stats(self) -> dict[str, Any]:
        """Counters for ``/admin/cache`` and the metrics."""

    async def close(self) -> None:
        """Release the tiers."""
