"""What a loaded GGUF model reports holding: its weights plus its context's KV cache."""

from __future__ import annotations

from pathlib import Path

from gguf_testing import load_context, loaded

from modelyard.backends.llamacpp.backend import GGUFBackend
from modelyard.core.types import Task

# The tiny llama: 2 layers, 2 KV heads of 16 dimensions; K and V in f16 (2 bytes).
KV_BYTES_PER_CELL = 2 * 2 * 2 * 16 * 2


async def test_memory_is_the_weights_plus_a_kv_cache_that_grows_with_the_slots(
    tiny_gguf: Path,
) -> None:
    async with loaded(tiny_gguf, Task.COMPLETION, parallel=1, n_ctx=256) as one_slot:
        one = one_slot.memory_bytes()
    async with loaded(tiny_gguf, Task.COMPLETION, parallel=2, n_ctx=256) as two_slots:
        two = two_slots.memory_bytes()
    assert one >= tiny_gguf.stat().st_size + 256 * KV_BYTES_PER_CELL
    assert two - one == 256 * KV_BYTES_PER_CELL  # one more slot of 256 cells


def test_an_unloaded_backend_reports_its_file(tiny_gguf: Path) -> None:
    backend = GGUFBackend(load_context(tiny_gguf, Task.COMPLETION))
    assert backend.memory_bytes() == tiny_gguf.stat().st_size
