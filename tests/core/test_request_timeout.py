"""A model's own timeout_ms turns a stuck request into 504, and the expired request never runs."""

from __future__ import annotations

import pytest

from modelyard.core.errors import TimeoutError_
from modelyard.core.service import InferenceService
from modelyard.core.types import EmbeddingRequest
from modelyard.testing import HangingBackend


async def test_model_timeout_ms_gives_504_and_the_queued_request_is_skipped(
    make_settings, plugin_host
) -> None:
    settings = make_settings(
        server={"request_timeout_s": 300},
        models=[{"name": "h", "backend": "hanging", "source": ".", "task": "embeddings",
                 "batching": {"max_batch_size": 1, "timeout_ms": 50}}],
    )
    service = InferenceService(settings, plugin_host)
    await service.start()
    await service.wait_until_loaded()
    try:
        import asyncio

        first = asyncio.ensure_future(service.infer("h", EmbeddingRequest(("a",))))
        with pytest.raises(TimeoutError_) as caught:
            await service.infer("h", EmbeddingRequest(("b",)))  # waits behind the first
        assert caught.value.status_code == 504
        backend = service.registry.get("h").backend
        assert isinstance(backend, HangingBackend)
        with pytest.raises(TimeoutError_):
            await first
        backend.open_gate()
        # The worker finishes the first call; the expired second one must be skipped.
        batcher = service.registry.get("h").batcher
        for _ in range(1000):
            if batcher.depth == 0:
                break
            await asyncio.sleep(0)
        assert backend.calls == [1]
    finally:
        await service.stop()
