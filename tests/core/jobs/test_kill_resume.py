"""SIGKILL a process whose answered lines are not committed yet: the restart runs them again,
and the output still holds every line exactly once."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from modelyard.core.auth import Principal
from modelyard.core.jobs import BatchJobs, BatchSettings, BatchStatus, LineResult

ALICE = Principal(id="alice", roles=frozenset({"user"}))
LINES = 12
ANSWERED_BEFORE_KILL = 5

#: Answers ANSWERED_BEFORE_KILL lines (never committed: the groups are too large), then says
#: "ready" with the batch id and hangs on the next line until it is killed.
CHILD = textwrap.dedent("""
    import asyncio, json, sys
    from pathlib import Path
    from modelyard.core.auth import Principal
    from modelyard.core.jobs import BatchJobs, BatchSettings, LineResult

    class Catalog:
        def known(self, model): return True
        def queue_depth(self, model): return 0

    async def main(data_dir, answer, lines):
        answered, hang = [], asyncio.Event()
        async def execute(endpoint, body, tenant):
            if len(answered) >= answer:
                print("ready", flush=True)
                await hang.wait()
            answered.append(body["input"])
            return LineResult(status_code=200, body={"input": body["input"]})
        settings = BatchSettings(max_in_flight_per_model=1, checkpoint_every_lines=1000,
                                 checkpoint_every_s=1000)
        jobs = BatchJobs(settings, Path(data_dir), execute, Catalog())
        await jobs.start()
        who = Principal(id="alice", roles=frozenset({"user"}))
        content = "".join(json.dumps({"custom_id": f"c{i}", "method": "POST",
                                      "url": "/v1/embeddings",
                                      "body": {"model": "m", "input": str(i)}}) + "\\n"
                          for i in range(lines)).encode()
        file = await jobs.create_file(who, "in.jsonl", "batch", content)
        batch = await jobs.create_batch(who, input_file_id=file.id, endpoint="/v1/embeddings")
        print(batch.id, flush=True)
        await hang.wait()

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
""")


class Catalog:
    def known(self, model: str) -> bool:
        return True

    def queue_depth(self, model: str) -> int:
        return 0


def _committed(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("SELECT COUNT(*) FROM results").fetchone()[0])


def _run_until_killed(data_dir: Path) -> str:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data_dir), str(ANSWERED_BEFORE_KILL), str(LINES)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        batch_id = child.stdout.readline().strip()
        assert batch_id.startswith("batch_"), batch_id
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    return batch_id


async def test_lines_answered_but_not_committed_run_again_and_are_written_once(
    tmp_path: Path,
) -> None:
    batch_id = _run_until_killed(tmp_path)
    assert _committed(tmp_path / "jobs.sqlite") == 0  # the answers died with the process

    runs: list[str] = []

    async def execute(endpoint: str, body: dict[str, Any], tenant: str) -> LineResult:
        runs.append(body["input"])
        return LineResult(status_code=200, body={"input": body["input"]})

    jobs = BatchJobs(BatchSettings(), tmp_path, execute, Catalog())
    await jobs.start()
    try:
        await asyncio.wait_for(jobs.wait(batch_id), timeout=10)
        batch = jobs.batch(ALICE, batch_id)
        assert batch.status is BatchStatus.COMPLETED
        assert batch.request_counts.completed == LINES
        assert sorted(runs, key=int) == [str(i) for i in range(LINES)]
        out = (await jobs.file_content(ALICE, batch.output_file_id or "")).splitlines()
        rows = [json.loads(line) for line in out]
        assert [r["custom_id"] for r in rows] == [f"c{i}" for i in range(LINES)]
        assert [r["response"]["body"]["input"] for r in rows] == [str(i) for i in range(LINES)]
    finally:
        await jobs.stop()
