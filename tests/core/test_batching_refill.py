"""After a batch of k, the batcher waits briefly for k requests instead of splitting them."""

from __future__ import annotations

import asyncio

from modelyard.core.backend import LoadContext
from modelyard.core.batching import Batcher
from modelyard.core.types import EmbeddingRequest, Task
from modelyard.testing import EchoOptions, HangingBackend

REQ = EmbeddingRequest(("x",))


async def _spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def _run(refill_wait_s: float) -> list[int]:
    backend = HangingBackend(LoadContext("h", "1", Task.EMBEDDINGS, ".", None, EchoOptions()))
    await backend.load()
    batcher = Batcher(backend, max_batch_size=8, max_queue_delay_s=0.0, max_queue_size=64,
                      refill_wait_s=refill_wait_s)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(REQ))
        await _spin()
        four = [asyncio.ensure_future(batcher.submit(REQ)) for _ in range(4)]
        await _spin()
        backend.open_gate()
        await asyncio.gather(first, *four)  # a batch of 1, then a batch of 4
        early = [asyncio.ensure_future(batcher.submit(REQ)) for _ in range(2)]
        await _spin()
        late = [asyncio.ensure_future(batcher.submit(REQ)) for _ in range(2)]
        await asyncio.gather(*early, *late)
        return backend.calls
    finally:
        await batcher.stop()


async def test_the_next_batch_waits_to_refill_to_the_last_size() -> None:
    assert await _run(refill_wait_s=5.0) == [1, 4, 4]


async def test_without_refill_wait_the_batch_splits() -> None:
    assert await _run(refill_wait_s=0.0) == [1, 4, 2, 2]
