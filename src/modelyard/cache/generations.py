"""The purge index: a token per model that is part of every key, kept in a file or a shared store.

Changing a model's token orphans its entries. Tiers need no way to list keys (Redis,
memcached and a plain LRU have none that scales), and a purge is one small write whatever the
entry count. Orphans are never read again and leave through each tier's LRU or TTL.

Keys are computed synchronously (``CacheLayer.key_for``), so an index kept elsewhere
(``modelyard.cache.redis``) hands out tokens from a local snapshot and gives each key a
*stamp*: the snapshot's epoch. Before a hit is served the layer asks whether that stamp is
still the index's (``is_current``); when it is not, or the index cannot be reached, the lookup
is a miss. The file index re-reads the file in ``token`` instead and stamps nothing.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Protocol, runtime_checkable

__all__ = ["GENERATIONS_FILE", "Generations", "PurgeGenerations", "SharesPurges"]

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.json"
_ALL = ""  # the generation every key carries; purging everything changes it


class Generations(Protocol):
    """Where the purge tokens live; the layer calls ``token`` and ``stamp`` in ``key_for``."""

    def token(self, model: str) -> str:
        """The generation part of ``model``'s keys, from what this process knows now."""

    @property
    def stamp(self) -> bytes:
        """What a key records of the tokens it was built from; empty when always current."""

    async def is_current(self, stamp: bytes) -> bool:
        """Whether tokens stamped ``stamp`` are still the index's; False when unsure."""

    async def bump(self, model: str | None) -> None:
        """Give ``model`` (None: every model) a new token, persisted before returning."""


@runtime_checkable
class SharesPurges(Protocol):
    """A tier shared by several servers, whose store also keeps their common purge index."""

    def purge_generations(self) -> Generations:
        """The index every server using this tier reads and bumps."""

    def preload(self) -> None:
        """Read that index now, blocking (the cache opens off the event loop), so the first
        keys are built from it; a store that cannot answer leaves it to the first lookup."""


class PurgeGenerations:
    """The purge index in ``<cache directory>/generations.json`` (0600, next to the secret).

    The tokens are random and persisted, so a restart does not revive purged entries, and
    workers sharing the directory see each other's purges (one ``stat`` per key tells).
    ``None`` keeps them in memory only.
    """

    def __init__(self, directory: Path | None) -> None:
        self._path = directory / GENERATIONS_FILE if directory is not None else None
        self._seen: tuple[int, int] | None = None
        self._tokens: dict[str, str] = self._load()

    def _stamp(self) -> tuple[int, int] | None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns

    def _load(self) -> dict[str, str]:
        if self._path is None:
            return {}
        self._seen = self._stamp()
        if self._seen is None:
            return {}
        try:
            raw = json.loads(self._path.read_text())
        except (OSError, ValueError) as exc:
            # Unknown generations could revive purged entries: start a fresh world instead.
            log.warning(
                "cannot read %s (%s); every cached entry is treated as purged", self._path, exc
            )
            return {_ALL: secrets.token_hex(8)}
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            return {_ALL: secrets.token_hex(8)}
        return {str(k): v for k, v in raw.items()}

    def token(self, model: str) -> str:
        # Another worker sharing the directory may have purged: one stat per key tells.
        if self._path is not None and self._stamp() != self._seen:
            self._tokens = self._load()
        return f"{self._tokens.get(_ALL, '')}/{self._tokens.get(model, '')}"

    @property
    def stamp(self) -> bytes:
        return b""  # ``token`` reads the file itself: its tokens are always current

    async def is_current(self, stamp: bytes) -> bool:
        return True

    async def bump(self, model: str | None) -> None:
        # A small file written under a lock: not worth a thread.
        if self._path is None:
            self._tokens[_ALL if model is None else model] = secrets.token_hex(8)
            return
        lock = os.open(
            self._path.with_name(GENERATIONS_FILE + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
        )
        try:
            # Read-modify-write under a lock: two workers purging at once both take effect.
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._tokens = self._load()
            self._tokens[_ALL if model is None else model] = secrets.token_hex(8)
            self._save(self._path)
        finally:
            os.close(lock)

    def _save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(self._tokens, out)
        os.replace(tmp, path)
        self._seen = self._stamp()
