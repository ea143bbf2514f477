"""``CacheLayer``: read through the tiers, promote hits, coalesce identical requests, store."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from modelyard.cache.codec import CorruptValue, ResultCodec
from modelyard.cache.generations import Generations, PurgeGenerations
from modelyard.cache.keys import (
    KeyFields,
    cache_key,
    derive_secrets,
    is_cacheable,
    request_fields,
    weights_digest,
)
from modelyard.core.cache_tier import CacheTier
from modelyard.core.types import GenerationResult, InferenceRequest, InferenceResult, StreamChunk

__all__ = ["CacheLayer", "Outcome", "PurgeGenerations", "replay_stream"]

log = logging.getLogger(__name__)

Outcome = Literal["hit", "miss"]
Run = Callable[[], Awaitable[InferenceResult]]
StartStream = Callable[[], Awaitable[AsyncIterator[StreamChunk]]]

#: Bytes of the key a tier sees; what ``key_for`` adds after them is the purge-index stamp.
_DIGEST_BYTES = 32


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    refreshes: int = 0
    errors: int = 0
    corrupt: int = 0
    #: Lookups not served because the shared purge index had moved on or could not be read.
    unverified: int = 0
    tier_errors: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)


class _Flight:
    """One lookup (and, on a miss, one backend call) that identical requests share."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[tuple[InferenceResult, Outcome]] = (
            asyncio.get_running_loop().create_future()
        )
        # Followers may all have gone (client disconnects); the error is still "retrieved".
        self.answer.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.task: asyncio.Task[None] | None = None


class CacheLayer:
    """The response cache in front of the backends.

    ``tiers`` are read in order; a hit in a lower tier is copied into every tier above it.
    Values are MAC'd with a key derived from ``secret``, so a tier shared with other writers
    (or edited on disk) can make us miss but never makes us serve bytes we did not write.
    ``generations`` is the purge index (see ``modelyard.cache.generations``); by default one
    in memory.
    """

    def __init__(
        self,
        tiers: Sequence[CacheTier],
        *,
        secret: bytes | str,
        generations: Generations | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a cache layer needs at least one tier")
        self.tiers = list(tiers)
        self._key_secret, mac_secret = derive_secrets(secret)
        self._codec = ResultCodec(mac_secret)
        self._generations = generations if generations is not None else PurgeGenerations(None)
        self._flights: dict[bytes, _Flight] = {}
        self._stats = LayerStats(tier_hits={self._tier_label(i): 0 for i in range(len(self.tiers))})

    def _tier_label(self, index: int) -> str:
        return f"{index}:{self.tiers[index].name}"

    # -- keys ----------------------------------------------------------------------------

    def key_for(
        self,
        request: InferenceRequest,
        *,
        model: str,
        version: str,
        weights_digest: str,
        backend: str,
        backend_version: str,
        tenant: str,
    ) -> bytes | None:
        """The key of ``request`` as served by that exact version; None if it is not cacheable.

        Tiers see its first 32 bytes; the rest stamps the purge tokens it was built from.
        """
        if not is_cacheable(request):
            return None
        task, params, payload = request_fields(request)
        fields = KeyFields(
            model=model,
            version=version,
            weights_digest=weights_digest,
            backend=backend,
            backend_version=backend_version,
            tenant=tenant,
            generation=self._generations.token(model),
            task=task,
            params=params,
            input=payload,
        )
        return cache_key(self._key_secret, fields) + self._generations.stamp

    def weights_digest(self, path: Path) -> str:
        """blake3 of the weight files at ``path`` (part of every key); reads files: off the loop."""
        return weights_digest(path)

    # -- lookups -------------------------------------------------------------------------

    async def lookup_or_run(
        self, key: bytes, run: Run, *, refresh: bool = False
    ) -> tuple[InferenceResult, Outcome]:
        """The cached answer, or ``run()``'s (then stored); identical concurrent keys share one.

        ``refresh`` (``Cache-Control: no-cache``) skips the read and stores the fresh answer.
        Errors are never cached; every request waiting on a failed call gets the error.
        """
        if refresh:
            self._stats.refreshes += 1
            result = await run()
            await self._store(key, result)
            return result, "miss"
        flight = self._flights.get(key)
        if flight is not None:
            self._stats.coalesced += 1
            result, _ = await asyncio.shield(flight.answer)
            return result, "hit"
        flight = _Flight()
        self._flights[key] = flight
        flight.task = asyncio.get_running_loop().create_task(self._fly(key, run, flight))
        flight.task.add_done_callback(lambda _: self._land(key, flight))
        return await asyncio.shield(flight.answer)

    def _land(self, key: bytes, flight: _Flight) -> None:
        # Also runs when the task was cancelled before it started (close), so nobody waits
        # forever on an answer that will not come.
        if not flight.answer.done():
            flight.answer.cancel()
        if self._flights.get(key) is flight:
            del self._flights[key]

    async def _fly(self, key: bytes, run: Run, flight: _Flight) -> None:
        # Runs as its own task: a leader whose client disconnects does not cancel the
        # followers' answer, and the store finishes even if nobody waits any more.
        cached = await self._read(key)
        if cached is not None:
            self._stats.hits += 1
            flight.answer.set_result((cached, "hit"))
            return
        self._stats.misses += 1
        try:
            result = await run()
        except Exception as exc:  # noqa: BLE001 - handed to every waiter
            self._stats.errors += 1
            flight.answer.set_exception(exc)
            return
        flight.answer.set_result((result, "miss"))
        # The flight stays registered until the store is done, so requests arriving in
        # between join it instead of missing.
        await self._store(key, result)

    async def lookup(self, key: bytes) -> InferenceResult | None:
        """Read through the tiers (promoting a lower hit); None on a miss."""
        return await self._read(key)

    async def _read(self, key: bytes) -> InferenceResult | None:
        key, stamp = key[:_DIGEST_BYTES], key[_DIGEST_BYTES:]
        if stamp and not await self._stamp_is_current(stamp):
            # Built from purge tokens the shared index no longer holds (or cannot confirm):
            # serving it could serve a purged answer, so it is a miss.
            self._stats.unverified += 1
            return None
        for index, tier in enumerate(self.tiers):
            try:
                value = await tier.get(key)
            except Exception:  # a failing tier is a miss, never a failed request
                self._stats.tier_errors += 1
                log.warning("cache tier %s failed on get", tier.name, exc_info=True)
                continue
            if value is None:
                continue
            try:
                result = self._codec.decode(value)
            except CorruptValue as exc:
                self._stats.corrupt += 1
                log.warning("cache tier %s held a corrupt entry (%s); removed", tier.name, exc)
                await self._quietly(tier, "delete", key)
                continue
            self._stats.tier_hits[self._tier_label(index)] += 1
            for upper in self.tiers[:index]:
                await self._quietly(upper, "set", key, value)
            return result
        return None

    async def _stamp_is_current(self, stamp: bytes) -> bool:
        try:
            return await self._generations.is_current(stamp)
        except Exception:  # unsure is a miss, never a failed request
            log.warning("the purge index could not be checked", exc_info=True)
            return False

    async def store(self, key: bytes, result: InferenceResult) -> None:
        """Store an answer in every tier (what a miss does)."""
        await self._store(key, result)

    async def _store(self, key: bytes, result: InferenceResult) -> None:
        # Stored even under a stale stamp: an answer computed now is right for its key, and a
        # key whose stamp is not current is never served (see ``_read``).
        key = key[:_DIGEST_BYTES]
        value = self._codec.encode(result)
        for tier in self.tiers:
            await self._quietly(tier, "set", key, value)

    async def _quietly(self, tier: CacheTier, op: Literal["set", "delete"], *args: bytes) -> None:
        try:
            await getattr(tier, op)(*args)
        except Exception:  # the answer is good even if a tier cannot keep it
            self._stats.tier_errors += 1
            log.warning("cache tier %s failed on %s", tier.name, op, exc_info=True)

    # -- streams -------------------------------------------------------------------------

    async def stream_through(
        self, key: bytes, start: StartStream, *, refresh: bool = False
    ) -> tuple[AsyncIterator[StreamChunk], Outcome]:
        """A cached generation replayed as a stream, or the backend's stream, stored at its end.

        Only a stream that reaches its final chunk is stored; one the client abandons is not.
        """
        if refresh:
            self._stats.refreshes += 1
        else:
            cached = await self._cached_or_in_flight(key)
            if isinstance(cached, GenerationResult):
                return replay_stream(cached), "hit"
            self._stats.misses += 1
        chunks = await start()
        return self._recording(key, chunks), "miss"

    async def _cached_or_in_flight(self, key: bytes) -> InferenceResult | None:
        flight = self._flights.get(key)
        if flight is not None:
            # An identical non-streamed request is running: share its answer.
            self._stats.coalesced += 1
            result, _ = await asyncio.shield(flight.answer)
            return result
        cached = await self._read(key)
        if cached is not None:
            self._stats.hits += 1
        return cached

    async def _recording(
        self, key: bytes, chunks: AsyncIterator[StreamChunk]
    ) -> AsyncIterator[StreamChunk]:
        texts: list[str] = []
        final: StreamChunk | None = None
        try:
            async for chunk in chunks:
                texts.append(chunk.text)
                if chunk.finish_reason is not None:
                    final = chunk
                yield chunk
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
        if final is not None and final.finish_reason is not None:
            result = GenerationResult(
                text="".join(texts),
                finish_reason=final.finish_reason,
                prompt_tokens=final.prompt_tokens or 0,
                completion_tokens=final.completion_tokens or 0,
            )
            await self._store(key, result)

    # -- administration ------------------------------------------------------------------

    async def purge(self, model: str | None = None) -> None:
        """Make every entry of ``model`` (or every entry) unreachable, at once, in every tier.

        ``None`` also clears each tier; a tier that cannot clear is logged, its entries being
        unreachable anyway. A shared purge index that cannot be reached raises
        ``ServiceUnavailableError``: nothing was purged.
        """
        await self._generations.bump(model)
        if model is None:
            for tier in self.tiers:
                try:
                    await tier.clear()
                except Exception:
                    self._stats.tier_errors += 1
                    log.warning("cache tier %s failed to clear", tier.name, exc_info=True)

    def stats(self) -> dict[str, Any]:
        """Counters since start plus each tier's own ``stats()`` where it has one."""
        s = self._stats
        looked = s.hits + s.misses
        tiers = []
        for i, tier in enumerate(self.tiers):
            own = getattr(tier, "stats", None)
            tiers.append(
                {
                    "tier": tier.name,
                    "hits": s.tier_hits[self._tier_label(i)],
                    **(own() if callable(own) else {}),
                }
            )
        return {
            "hits": s.hits,
            "misses": s.misses,
            "coalesced": s.coalesced,
            "refreshes": s.refreshes,
            "errors": s.errors,
            "corrupt": s.corrupt,
            "unverified": s.unverified,
            "tier_errors": s.tier_errors,
            "in_flight": len(self._flights),
            "hit_ratio": round(s.hits / looked, 4) if looked else 0.0,
            "tiers": tiers,
        }

    async def settle(self) -> None:
        """Wait until every lookup in flight, and the store after it, is done."""
        tasks = [f.task for f in list(self._flights.values()) if f.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Cancel lookups still waiting on a backend, let pending stores finish, close tiers."""
        tasks = [f.task for f in self._flights.values() if f.task is not None]
        for flight in self._flights.values():
            if flight.task is not None and not flight.answer.done():
                flight.task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for tier in self.tiers:
            try:
                await tier.close()
            except Exception:
                log.warning("cache tier %s failed to close", tier.name, exc_info=True)


_PIECES = re.compile(r"\s*\S+|\s+")


async def replay_stream(result: GenerationResult) -> AsyncIterator[StreamChunk]:
    """A cached generation as a stream: word-sized pieces, then the final chunk with usage."""
    for piece in _PIECES.findall(result.text):
        yield StreamChunk(text=piece)
    yield StreamChunk(
        text="",
        finish_reason=result.finish_reason,
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
    )
