"""BatchJobs without HTTP: create-time checks, owners, quotas, cancel, resume, expiry."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.core.auth import Principal
from modelyard.core.errors import (
    BadRequestError,
    ConflictError,
    NotFoundError,
    RateLimitedError,
)
from modelyard.core.jobs import BatchJobs, BatchSettings, BatchStatus, LineResult

ALICE = Principal(id="alice", roles=frozenset({"user"}))
BOB = Principal(id="bob", roles=frozenset({"user"}))
ADMIN = Principal(id="root", roles=frozenset({"admin"}))
URL = "/v1/chat/completions"


class Catalog:
    depth = 0

    def known(self, model: str) -> bool:
        return model in {"m", "n"}

    def queue_depth(self, model: str) -> int:
        return self.depth


class Executor:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self, endpoint: str, body: dict[str, Any], tenant: str) -> LineResult:
        self.calls.append(body["messages"][0]["content"])
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        return LineResult(status_code=200, body={"echo": body["messages"][0]["content"]})


def _line(i: int | str, model: str = "m", url: str = URL, custom_id: str | None = None) -> str:
    return json.dumps({"custom_id": custom_id or f"c{i}", "method": "POST", "url": url,
                       "body": {"model": model, "messages": [{"role": "user",
                                                              "content": str(i)}]}})


def _file(*lines: str) -> bytes:
    return "\n".join(lines).encode() + b"\n"


@pytest.fixture
def executor() -> Executor:
    return Executor()


@pytest.fixture
async def jobs(tmp_path: Path, executor: Executor) -> AsyncIterator[BatchJobs]:
    made = BatchJobs(BatchSettings(retry_backoff_s=0, max_line_bytes=400), tmp_path,
                     executor, Catalog())
    await made.start()
    try:
        yield made
    finally:
        await made.stop()


async def _batch(jobs: BatchJobs, content: bytes, who: Principal = ALICE) -> str:
    file = await jobs.create_file(who, "in.jsonl", "batch", content)
    return (await jobs.create_batch(who, input_file_id=file.id, endpoint=URL)).id


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (_file(_line(0), "not json"), "line 2: not a JSON request object"),
        (_file(_line(0), _line(1, url="/v1/embeddings")), "line 2: url '/v1/embeddings'"),
        (_file(_line(0), _line(1, model="nope")), "line 2: unknown model 'nope'"),
        (_file(_line(0), _line("x" * 500)), "line 2: "),
        (_file(_line(0), _line(1, custom_id="c0")), "line 2: duplicate custom_id 'c0'"),
    ],
)
async def test_a_bad_input_file_is_refused_at_create_naming_the_line(
    jobs: BatchJobs, content: bytes, problem: str
) -> None:
    file = await jobs.create_file(ALICE, "in.jsonl", "batch", content)
    with pytest.raises(BadRequestError) as refused:
        await jobs.create_batch(ALICE, input_file_id=file.id, endpoint=URL)
    assert problem in refused.value.detail
    assert refused.value.extra["line"] == 2
    assert jobs.batches(ALICE).data == []


async def test_a_wrong_endpoint_is_refused(jobs: BatchJobs) -> None:
    file = await jobs.create_file(ALICE, "in.jsonl", "batch", _file(_line(0)))
    with pytest.raises(BadRequestError, match="endpoint must be one of"):
        await jobs.create_batch(ALICE, input_file_id=file.id, endpoint="/v1/classify")


async def test_a_principal_sees_only_its_own_and_an_admin_sees_all(jobs: BatchJobs) -> None:
    batch_id = await _batch(jobs, _file(_line(0)))
    file_id = jobs.batch(ALICE, batch_id).input_file_id
    with pytest.raises(NotFoundError):
        jobs.batch(BOB, batch_id)
    with pytest.raises(NotFoundError):
        jobs.cancel(BOB, batch_id)
    with pytest.raises(NotFoundError):
        await jobs.file_content(BOB, file_id)
    with pytest.raises(BadRequestError):  # bob cannot run a batch over alice's file
        await jobs.create_batch(BOB, input_file_id=file_id, endpoint=URL)
    assert jobs.batches(BOB).data == [] and jobs.files(BOB).data == []
    assert [b.id for b in jobs.batches(ADMIN).data] == [batch_id]
    assert jobs.batch(ADMIN, batch_id).id == batch_id


async def test_quotas_on_stored_bytes_and_unfinished_batches(
    tmp_path: Path, executor: Executor
) -> None:
    executor.gate = asyncio.Event()
    jobs = BatchJobs(BatchSettings(max_stored_bytes_per_principal=300,
                                   max_running_batches_per_principal=1),
                     tmp_path, executor, Catalog())
    await jobs.start()
    try:
        await _batch(jobs, _file(_line(0)))
        with pytest.raises(RateLimitedError, match="batch quota"):
            await _batch(jobs, _file(_line(1)))
        with pytest.raises(RateLimitedError, match="storage quota"):
            await jobs.create_file(ALICE, "big.jsonl", "batch", b"x" * 300)
        await jobs.create_file(BOB, "b.jsonl", "batch", _file(_line(0)))  # bob's own quota
    finally:
        executor.gate.set()
        await jobs.stop()


async def test_cancel_stops_a_job_within_a_second(jobs: BatchJobs, executor: Executor) -> None:
    executor.gate = asyncio.Event()  # every line hangs until cancelled
    batch_id = await _batch(jobs, _file(*(_line(i) for i in range(20))))
    await executor.started.wait()
    assert jobs.cancel(ALICE, batch_id).status is BatchStatus.CANCELLING
    await asyncio.wait_for(jobs.wait(batch_id), timeout=1)
    batch = jobs.batch(ALICE, batch_id)
    assert batch.status is BatchStatus.CANCELLED and batch.cancelled_at is not None
    assert len(executor.calls) <= jobs.settings.max_in_flight_per_model
    with pytest.raises(ConflictError):
        jobs.cancel(ALICE, batch_id)


async def test_a_restarted_store_resumes_only_the_lines_not_answered(
    tmp_path: Path, executor: Executor
) -> None:
    settings = BatchSettings(max_in_flight_per_model=1)
    first = BatchJobs(settings, tmp_path, executor, Catalog())
    await first.start()
    executor.gate = asyncio.Event()
    batch_id = await _batch(first, _file(*(_line(i) for i in range(5))))
    await executor.started.wait()
    executor.gate.set()
    while first.batch(ALICE, batch_id).request_counts.completed < 2:
        await asyncio.sleep(0)
    executor.gate.clear()
    await first.stop()  # as if the process died: the job is left in progress
    second_calls = Executor()
    second = BatchJobs(settings, tmp_path, second_calls, Catalog())
    await second.start()
    try:
        await asyncio.wait_for(second.wait(batch_id), timeout=5)
        batch = second.batch(ALICE, batch_id)
        assert batch.status is BatchStatus.COMPLETED
        assert batch.request_counts.completed == 5
        out = (await second.file_content(ALICE, batch.output_file_id or "")).splitlines()
        assert sorted(json.loads(line)["custom_id"] for line in out) == [
            f"c{i}" for i in range(5)]
        assert len(executor.calls) + len(second_calls.calls) <= 5 + 1  # one in flight re-run
    finally:
        await second.stop()


async def test_batch_lines_wait_while_the_model_queue_is_long(
    tmp_path: Path, executor: Executor
) -> None:
    catalog = Catalog()
    catalog.depth = 10
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) == 3:
            catalog.depth = 0  # the interactive queue has drained
        await asyncio.sleep(0)

    jobs = BatchJobs(BatchSettings(), tmp_path, executor, catalog, sleep=sleep)
    await jobs.start()
    try:
        batch_id = await _batch(jobs, _file(_line(0)))
        await asyncio.wait_for(jobs.wait(batch_id), timeout=5)
        assert len(slept) >= 3 and executor.calls == ["0"]
    finally:
        await jobs.stop()


async def test_files_expire(tmp_path: Path, executor: Executor) -> None:
    now = [1000.0]
    jobs = BatchJobs(BatchSettings(file_expiry_s=60), tmp_path, executor, Catalog(),
                     wall_clock=lambda: now[0])
    await jobs.start()
    try:
        file = await jobs.create_file(ALICE, "in.jsonl", "batch", _file(_line(0)))
        assert file.expires_at == 1060
        now[0] = 1061
        with pytest.raises(NotFoundError):
            jobs.file(ALICE, file.id)
        await jobs.create_file(ALICE, "again.jsonl", "batch", _file(_line(0)))  # sweeps
        assert not (tmp_path / "files" / file.id).exists()
    finally:
        await jobs.stop()
