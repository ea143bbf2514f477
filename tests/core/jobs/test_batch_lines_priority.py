"""A job's lines reach the model's batcher as background work, behind interactive requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from modelyard.core.auth import Principal
from modelyard.core.backend import LoadContext
from modelyard.core.batching import Batcher
from modelyard.core.jobs import BatchJobs, BatchSettings, BatchStatus, LineResult
from modelyard.core.types import CompletionRequest, InferenceRequest, InferenceResult, Task
from modelyard.testing import CountingBackend, EchoOptions

ALICE = Principal(id="alice", roles=frozenset({"user"}))
URL = "/v1/completions"


class GatedBackend(CountingBackend):
    """Records each batch's prompts; its first call waits for ``gate``."""

    name = "gated-lines"

    def __init__(self) -> None:
        super().__init__(LoadContext(model="m", version="1", task=Task.COMPLETION, source=".",
                                     path=None, options=EchoOptions()))
        self.gate = asyncio.Event()
        self.seen: list[list[str]] = []

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        self.seen.append([r.prompt for r in batch if isinstance(r, CompletionRequest)])
        if len(self.seen) == 1:
            await self.gate.wait()
        return await super().infer(batch)


class Catalog:
    def __init__(self, batcher: Batcher) -> None:
        self.batcher = batcher

    def known(self, model: str) -> bool:
        return model == "m"

    def queue_depth(self, model: str) -> int:
        return self.batcher.depth


def executor(batcher: Batcher) -> Callable[..., Any]:
    """A line executor that submits the line's prompt to ``batcher`` (as the pipeline does)."""

    async def execute(endpoint: str, body: dict[str, Any], tenant: str) -> LineResult:
        await batcher.submit(CompletionRequest(body["prompt"]))
        return LineResult(status_code=200, body={"prompt": body["prompt"]})

    return execute


async def until(condition: Callable[[], bool], *, turns: int = 10_000) -> None:
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_batch_lines_queue_behind_interactive_requests(tmp_path: Path) -> None:
    backend = GatedBackend()
    batcher = Batcher(backend, max_batch_size=2, max_queue_delay_s=0.0, max_queue_size=64,
                      background_idle_s=0.0)
    batcher.start()
    jobs = BatchJobs(BatchSettings(max_in_flight_per_model=3), tmp_path, executor(batcher),
                     Catalog(batcher))
    await jobs.start()
    try:
        busy = asyncio.create_task(batcher.submit(CompletionRequest("busy")))
        await until(lambda: len(backend.seen) == 1)
        content = "".join(json.dumps({
            "custom_id": f"c{i}", "method": "POST", "url": URL,
            "body": {"model": "m", "prompt": f"line{i}"}}) + "\n" for i in range(3)).encode()
        file = await jobs.create_file(ALICE, "in.jsonl", "batch", content)
        batch_id = (await jobs.create_batch(ALICE, input_file_id=file.id, endpoint=URL)).id
        await until(lambda: batcher.depth + batcher.background_depth == 3)
        later = [asyncio.create_task(batcher.submit(CompletionRequest(f"live{i}")))
                 for i in range(2)]
        await until(lambda: batcher.depth + batcher.background_depth == 5)

        backend.gate.set()
        await asyncio.gather(busy, *later)
        await asyncio.wait_for(jobs.wait(batch_id), timeout=5)
        assert jobs.batch(ALICE, batch_id).status is BatchStatus.COMPLETED
        # The lines came first but wait: the interactive requests make the next batch.
        assert backend.seen[1] == ["live0", "live1"]
        assert sorted(p for batch in backend.seen[2:] for p in batch) == [
            "line0", "line1", "line2"]
    finally:
        await jobs.stop()
        await batcher.stop()
