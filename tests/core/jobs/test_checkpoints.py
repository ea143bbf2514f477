"""Answered lines are committed in groups; what a restart finds is run again, written once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from modelyard.core.auth import Principal
from modelyard.core.jobs import BatchJobs, BatchSettings, BatchStatus, LineResult
from modelyard.core.jobs.model import Batch
from modelyard.core.jobs.store import JobStore, Owned

ALICE = Principal(id="alice", roles=frozenset({"user"}))
URL = "/v1/chat/completions"


def committed(path: Path) -> int:
    """Result rows on disk, as a process started after a kill would find them."""
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])


class Catalog:
    def known(self, model: str) -> bool:
        return model == "m"

    def queue_depth(self, model: str) -> int:
        return 0


class SteppedExecutor:
    """Answers one line per ``step()``; ``started`` counts the lines that reached it."""

    def __init__(self) -> None:
        self.permits: asyncio.Queue[None] = asyncio.Queue()
        self.started = 0

    def step(self, lines: int = 1) -> None:
        for _ in range(lines):
            self.permits.put_nowait(None)

    async def __call__(self, endpoint: str, body: dict[str, Any], tenant: str) -> LineResult:
        self.started += 1
        await self.permits.get()
        return LineResult(status_code=200, body={"n": body["messages"][0]["content"]})


def _file(lines: int) -> bytes:
    return b"".join(json.dumps({
        "custom_id": f"c{i}", "method": "POST", "url": URL,
        "body": {"model": "m", "messages": [{"role": "user", "content": str(i)}]},
    }).encode() + b"\n" for i in range(lines))


class ManualSleep:
    """An injected ``sleep`` that returns only when the test calls ``fire``."""

    def __init__(self) -> None:
        self.waiting: list[tuple[float, asyncio.Future[None]]] = []

    async def __call__(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((seconds, done))
        await done

    def fire(self) -> list[float]:
        """End every sleep now; the seconds each had asked for."""
        waiting, self.waiting = self.waiting, []
        for _, done in waiting:
            if not done.done():
                done.set_result(None)
        return [seconds for seconds, _ in waiting]


async def until(condition: Callable[[], bool], *, turns: int = 10_000) -> None:
    for _ in range(turns):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


@pytest.fixture
def settings() -> BatchSettings:
    return BatchSettings(max_in_flight_per_model=1, checkpoint_every_lines=3,
                         checkpoint_every_s=10.0)


@pytest.fixture
async def started(
    tmp_path: Path, settings: BatchSettings
) -> AsyncIterator[tuple[BatchJobs, SteppedExecutor, ManualSleep]]:
    sleep = ManualSleep()
    execute = SteppedExecutor()
    jobs = BatchJobs(settings, tmp_path, execute, Catalog(), sleep=sleep)
    await jobs.start()
    try:
        yield jobs, execute, sleep
    finally:
        execute.step(100)
        await jobs.stop()


async def _create(jobs: BatchJobs, lines: int) -> str:
    file = await jobs.create_file(ALICE, "in.jsonl", "batch", _file(lines))
    return (await jobs.create_batch(ALICE, input_file_id=file.id, endpoint=URL)).id


async def test_lines_are_committed_every_n_lines_or_t_seconds(
    started: tuple[BatchJobs, SteppedExecutor, ManualSleep], tmp_path: Path
) -> None:
    jobs, execute, sleep = started
    progress: list[int] = []
    jobs.listeners.append(lambda b: progress.append(b.request_counts.completed)
                          if b.status is BatchStatus.IN_PROGRESS else None)
    batch_id = await _create(jobs, 5)
    db = tmp_path / "jobs.sqlite"
    await until(lambda: execute.started == 1)

    execute.step(2)
    await until(lambda: execute.started == 3)  # lines 0 and 1 answered (and recorded)
    assert committed(db) == 0 and progress == [0]
    execute.step()
    await until(lambda: execute.started == 4)
    assert committed(db) == 3 and progress == [0, 3]  # the third line made a group

    execute.step()
    await until(lambda: execute.started == 5)
    assert committed(db) == 3  # one line waits for the next group ...
    assert sleep.fire() == [10.0]  # ... or checkpoint_every_s
    await until(lambda: committed(db) == 4)
    assert progress == [0, 3, 4]

    execute.step()
    await asyncio.wait_for(jobs.wait(batch_id), timeout=5)
    batch = jobs.batch(ALICE, batch_id)
    assert batch.status is BatchStatus.COMPLETED and batch.request_counts.completed == 5
    out = (await jobs.file_content(ALICE, batch.output_file_id or "")).splitlines()
    assert [json.loads(line)["custom_id"] for line in out] == [f"c{i}" for i in range(5)]


async def test_reading_a_batch_sees_every_line_answered(
    started: tuple[BatchJobs, SteppedExecutor, ManualSleep], tmp_path: Path
) -> None:
    jobs, execute, _ = started
    batch_id = await _create(jobs, 5)
    execute.step(2)
    await until(lambda: execute.started == 3)
    assert committed(tmp_path / "jobs.sqlite") == 0
    assert jobs.batch(ALICE, batch_id).request_counts.completed == 2  # and commits them
    assert committed(tmp_path / "jobs.sqlite") == 2


async def test_a_stop_commits_the_lines_answered_and_a_restart_runs_only_the_rest(
    tmp_path: Path, settings: BatchSettings
) -> None:
    first_calls = SteppedExecutor()
    first = BatchJobs(settings, tmp_path, first_calls, Catalog())
    await first.start()
    batch_id = await _create(first, 5)
    first_calls.step(2)
    await until(lambda: first_calls.started == 3)
    await first.stop()  # line 2 is in flight: it is not answered, so it runs again
    assert committed(tmp_path / "jobs.sqlite") == 2

    second_calls = SteppedExecutor()
    second_calls.step(5)
    second = BatchJobs(settings, tmp_path, second_calls, Catalog())
    await second.start()
    try:
        await asyncio.wait_for(second.wait(batch_id), timeout=5)
        assert second_calls.started == 3
        batch = second.batch(ALICE, batch_id)
        assert batch.request_counts.completed == 5
        out = (await second.file_content(ALICE, batch.output_file_id or "")).splitlines()
        assert [json.loads(line)["custom_id"] for line in out] == [f"c{i}" for i in range(5)]
    finally:
        await second.stop()


def test_a_line_recorded_again_after_a_restart_is_written_once(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    store = JobStore(path)
    store.record("batch_x", 0, True, b"first")
    store.record("batch_x", 1, True, b"second")
    assert committed(path) == 0 and store.unsaved == 2  # not a checkpoint yet
    assert store.flush() == {"batch_x"}
    assert committed(path) == 2 and store.unsaved == 0
    store.record("batch_x", 1, True, b"second, run again")  # in flight at a kill, re-run
    store.record("batch_x", 2, False, b"third")
    assert store.done_lines("batch_x") == {0, 1, 2}  # a read commits what waits
    assert list(store.results("batch_x", True)) == [b"first", b"second"]
    assert list(store.results("batch_x", False)) == [b"third"]
    store.close()


def test_request_counts_are_counted_once_then_kept_by_each_flush(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    store.add_batch(Batch(id="batch_y", endpoint=URL, input_file_id="file-x",
                          completion_window="24h", status=BatchStatus.IN_PROGRESS,
                          created_at=0), Owned("alice"))
    for line in range(3):
        store.record("batch_y", line, line != 1, b"{}")
    store.flush()
    scans: list[str] = []
    # Counting a 50,000-line batch blocks the event loop for tens of milliseconds: it must
    # not happen on every poll or progress event. The queries are what this test checks.
    store._db.set_trace_callback(lambda sql: scans.append(sql) if "COUNT" in sql else None)

    def counts() -> tuple[int, int]:
        found = store.batch("batch_y")
        assert found is not None
        return found[0].request_counts.completed, found[0].request_counts.failed

    assert counts() == (2, 1)
    store.record("batch_y", 3, True, b"{}")
    store.record("batch_y", 4, False, b"{}")
    assert counts() == (3, 2)
    assert counts() == (3, 2)
    assert len(scans) == 1
    store.record("batch_y", 0, True, b"{}")  # already there: written once, counted once
    assert counts() == (3, 2)
    store.close()
