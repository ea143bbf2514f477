"""Which free sequence slot a request takes, and how much of its prompt that slot already holds.

With the prefix cache on, a finished request leaves its KV cells in its slot, and the slot
remembers the tokens they hold (prompt and generated text). A newcomer goes to the free slot
whose cached tokens share the longest prefix with its prompt (llama-server's ``cache_prompt``
with slot selection by similarity), so only the rest of the prompt is decoded. Without a hit of
at least ``min_prefix_tokens`` it takes the free slot that keeps the running sequence ids
densest (each run of consecutive ids costs llama.cpp a pass over the weights per step), an
empty slot before one that holds a cached prefix, then the least recently used one.

With the cache off a newcomer takes the lowest free id and a finished slot is cleared.
This is bookkeeping only: the engine thread makes the llama.cpp calls.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Sequence

import msgspec

__all__ = ["PrefixCacheStats", "SlotChoice", "Slots", "common_prefix_length"]


class SlotChoice(msgspec.Struct, frozen=True):
    """A slot for a newcomer: its id and how many leading prompt tokens its cells hold."""

    seq_id: int
    reusable: int
    #: Tokens in the slot's cells now (the tail past ``reusable`` is to be dropped).
    cached: int


class PrefixCacheStats(msgspec.Struct, frozen=True):
    """Counters since load: requests admitted, those that reused a prefix, tokens saved."""

    requests: int = 0
    hits: int = 0
    tokens_reused: int = 0
    prompt_tokens: int = 0


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix, comparing slices in C rather than token by token."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        if a[low:mid] == b[low:mid]:
            low = mid
        else:
            high = mid
    return low


class Slots:
    """The engine thread's view of its slots: which are free, and what each one caches."""

    def __init__(self, count: int, *, prefix_cache: bool, min_prefix_tokens: int) -> None:
        self.prefix_cache = prefix_cache
        self.min_prefix_tokens = min_prefix_tokens
        self._free = list(range(count))  # a heap: the lowest free id first
        self._cached: list[list[int]] = [[] for _ in range(count)]
        self._used_at = [0] * count  # admission number of the slot's last request; 0: never
        self._admitted = 0
        self._hits = 0
        self._reused = 0
        self._prompted = 0

    @property
    def any_free(self) -> bool:
        return bool(self._free)

    def cached(self, seq_id: int) -> list[int]:
        """The tokens whose KV cells the (free) slot still holds."""
        return self._cached[seq_id]

    def take(self, prompt: Sequence[int], active: Collection[int]) -> SlotChoice:
        """Hand out a free slot for ``prompt``; ``active`` are the ids decoding now."""
        if not self.prefix_cache:
            return SlotChoice(heapq.heappop(self._free), 0, 0)
        best: tuple[int, int, bool, int, int] | None = None
        for seq_id in self._free:
            cached = self._cached[seq_id]
            # At least one prompt token is always decoded: its logits give the first token.
            reusable = min(common_prefix_length(cached, prompt), len(prompt) - 1)
            if reusable < self.min_prefix_tokens:
                reusable = 0
            key = (-reusable, _runs_added(seq_id, active), bool(cached),
                   self._used_at[seq_id], seq_id)
            if best is None or key < best:
                best = key
        assert best is not None, "take() called without a free slot"
        seq_id = best[-1]
        self._free.remove(seq_id)
        heapq.heapify(self._free)
        return SlotChoice(seq_id, -best[0], len(self._cached[seq_id]))

    def started(self, seq_id: int, reused: int, prompt_tokens: int) -> None:
        """Count a request that took ``seq_id`` with ``reused`` tokens already in its cells."""
        self._admitted += 1
        self._used_at[seq_id] = self._admitted
        self._cached[seq_id] = []  # the sequence owns its cells until it gives them back
        self._prompted += prompt_tokens
        if reused:
            self._hits += 1
            self._reused += reused

    def give_back(self, seq_id: int, kept: list[int] | None) -> None:
        """Free ``seq_id``; ``kept`` are the tokens its cells still hold (None: cleared)."""
        self._cached[seq_id] = kept if kept is not None and self.prefix_cache else []
        heapq.heappush(self._free, seq_id)

    def forget(self, seq_id: int) -> None:
        """The slot's cells were cleared outside a request (embeddings use the slots too)."""
        self._cached[seq_id] = []

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            requests=self._admitted, hits=self._hits, tokens_reused=self._reused,
            prompt_tokens=self._prompted,
        )


def _runs_added(seq_id: int, active: Collection[int]) -> int:
    """How many more runs of consecutive ids ``active`` has once ``seq_id`` joins it."""
    return 1 - (seq_id - 1 in active) - (seq_id + 1 in active)
