"""``BatchRunner``: runs batch jobs line by line, behind interactive traffic, resumably.

Each job is one task. Its lines enter the model's pipeline through ``LineExecutor`` (the same
translation the live endpoints use) as background work (``background_work``: the model's
batcher serves them behind every interactive request) under the batch share: at most
``max_in_flight_per_model`` batch lines per model, each admitted only while the model's
interactive queue is short. Answers are checkpointed in groups (``JobStore.record``, then
``flush`` every ``checkpoint_every_lines`` lines or ``checkpoint_every_s`` seconds); a
restarted runner skips the lines already committed and runs the others again. Cancelling a
job cancels its lines in flight (their callers leave, so the batcher drops them) and writes
what was answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec

from modelyard.core.batching import background_work
from modelyard.core.jobs.files import FileStore
from modelyard.core.jobs.inputs import read_input
from modelyard.core.jobs.model import (
    Batch,
    BatchError,
    BatchErrors,
    BatchStatus,
    FileObject,
    InputLine,
    LineExecutor,
    LineResult,
)
from modelyard.core.jobs.settings import BatchSettings
from modelyard.core.jobs.store import JobStore, Owned

__all__ = ["BatchRunner", "ProgressListener", "output_file_ids"]

log = logging.getLogger(__name__)

#: Told the batch (with fresh ``request_counts``) after each checkpoint and status change:
#: the hook an event bus subscribes to for batch progress and completion.
ProgressListener = Callable[[Batch], None]
Sleep = Callable[[float], Awaitable[None]]


def output_file_ids(batch_id: str) -> tuple[str, str]:
    """The output and error file ids of a batch: fixed, so finishing twice writes them once."""
    stem = batch_id.removeprefix("batch_")
    return f"file-{stem}-output", f"file-{stem}-errors"


class BatchRunner:
    """Runs every unfinished batch of one store; ``stop`` leaves their state to resume."""

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        settings: BatchSettings,
        execute: LineExecutor,
        *,
        queue_depth: Callable[[str], int],
        wall_clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._store = store
        self._files = files
        self._settings = settings
        self._execute = execute
        self._queue_depth = queue_depth
        self._now = wall_clock
        self._sleep = sleep
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancels: dict[str, asyncio.Event] = {}
        self._slots: dict[str, asyncio.Semaphore] = {}
        #: Commits the lines recorded so far ``checkpoint_every_s`` after the first of them.
        self._flusher: asyncio.Task[None] | None = None
        self.listeners: list[ProgressListener] = []

    # -- control ---------------------------------------------------------------------------

    def resume_all(self) -> None:
        for batch_id in self._store.unfinished():
            self.launch(batch_id)

    def launch(self, batch_id: str) -> None:
        if batch_id in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._run(batch_id))
        self._tasks[batch_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(batch_id, None))

    def cancel(self, batch_id: str) -> None:
        """Stop a running job now; it then writes its partial output and turns cancelled."""
        self._cancels.setdefault(batch_id, asyncio.Event()).set()
        self.launch(batch_id)  # a job not running (yet) finishes as cancelled at once

    async def wait(self, batch_id: str) -> None:
        task = self._tasks.get(batch_id)
        if task is not None:
            await asyncio.shield(task)

    async def stop(self) -> None:
        """Cancel every job task; their checkpoints stay, the next start resumes them."""
        tasks = list(self._tasks.values())
        if self._flusher is not None:
            tasks.append(self._flusher)  # the store commits what waits when it closes
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one job ---------------------------------------------------------------------------

    def _stamp(self) -> int:
        return int(self._now())

    def _save(self, batch: Batch) -> None:
        self._store.save_batch(batch)
        self._notify(batch.id)

    def _notify(self, batch_id: str) -> None:
        if not self.listeners:
            return
        found = self._store.batch(batch_id)
        if found is None:
            return
        for listener in self.listeners:
            try:
                listener(found[0])
            except Exception:  # noqa: BLE001 - a listener must not stop a job
                log.exception("batch progress listener failed")

    async def _run(self, batch_id: str) -> None:
        found = self._store.batch(batch_id)
        if found is None:
            return
        batch, owned = found
        cancel = self._cancels.setdefault(batch_id, asyncio.Event())
        if batch.status is BatchStatus.VALIDATING and not cancel.is_set():
            batch.status, batch.in_progress_at = BatchStatus.IN_PROGRESS, self._stamp()
            self._save(batch)
        if batch.status is BatchStatus.CANCELLING or cancel.is_set():
            outcome = BatchStatus.CANCELLED
        elif batch.status is BatchStatus.IN_PROGRESS:
            outcome = await self._work(batch, owned, cancel)
        else:  # finalizing: it died while writing its output; write it again
            outcome = BatchStatus.COMPLETED
        await self._finish(batch_id, outcome)
        self._cancels.pop(batch_id, None)

    async def _work(self, batch: Batch, owned: Owned, cancel: asyncio.Event) -> BatchStatus:
        try:
            data = await asyncio.to_thread(self._files.read, batch.input_file_id)
            lines = read_input(data)
        except (OSError, msgspec.DecodeError):
            log.exception("batch %s: its input file cannot be read", batch.id)
            batch.errors = BatchErrors(data=[BatchError(
                code="input_file_unreadable",
                message=f"the input file {batch.input_file_id} can no longer be read")])
            self._store.save_batch(batch)
            return BatchStatus.FAILED
        done = self._store.done_lines(batch.id)
        pending = [i for i in range(len(lines)) if i not in done]
        work = asyncio.ensure_future(self._lines(batch, owned, lines, pending))
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            await asyncio.wait({work, cancelled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, cancelled):
                task.cancel()
            await asyncio.gather(work, cancelled, return_exceptions=True)
        if cancel.is_set():
            return BatchStatus.CANCELLED
        if work.exception() is not None:
            log.error("batch %s failed", batch.id, exc_info=work.exception())
            batch.errors = BatchErrors(data=[BatchError(
                code="internal", message="the batch failed; the server log has the detail")])
            self._store.save_batch(batch)
            return BatchStatus.FAILED
        return BatchStatus.EXPIRED if work.result() else BatchStatus.COMPLETED

    async def _lines(
        self, batch: Batch, owned: Owned, lines: list[InputLine], pending: list[int]
    ) -> bool:
        """Run the pending lines under the batch share; True when the batch expired first."""
        async with asyncio.TaskGroup() as group:
            for index in pending:
                if batch.expires_at is not None and self._now() >= batch.expires_at:
                    return True
                line = lines[index]
                slots = self._slots.setdefault(
                    line.model, asyncio.Semaphore(self._settings.max_in_flight_per_model)
                )
                await slots.acquire()
                try:
                    await self._admitted(line.model)
                except BaseException:
                    slots.release()
                    raise
                group.create_task(self._line(batch.id, batch.endpoint, owned, index, line,
                                             slots))
        return False

    async def _admitted(self, model: str) -> None:
        """Wait while the model's queue is long: interactive requests go first."""
        while self._queue_depth(model) >= self._settings.admit_below_queue_depth:
            await self._sleep(self._settings.admit_poll_s)

    async def _line(
        self, batch_id: str, endpoint: str, owned: Owned, index: int, line: InputLine,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            result = await self._attempts(endpoint, line, owned.tenant)
        finally:
            slots.release()
        ok = result.status_code == 200
        payload = msgspec.json.encode({
            "id": "batch_req_" + uuid.uuid4().hex,
            "custom_id": line.custom_id,
            "response": {"status_code": result.status_code, "request_id": result.request_id,
                         "body": result.body},
            "error": None,
        })
        self._store.record(batch_id, index, ok, payload)
        self._checkpoint()

    def _checkpoint(self) -> None:
        """Commit the lines answered once ``checkpoint_every_lines`` wait, else soon after."""
        unsaved = self._store.unsaved
        if unsaved >= self._settings.checkpoint_every_lines:
            self._flush()
        elif unsaved and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await self._sleep(self._settings.checkpoint_every_s)
        try:
            self._flush()
        except Exception:  # noqa: BLE001 - the lines stay buffered; the next flush retries
            log.exception("batch checkpoint failed")

    def _flush(self) -> None:
        for batch_id in self._store.flush():
            self._notify(batch_id)

    async def _attempts(self, endpoint: str, line: InputLine, tenant: str) -> LineResult:
        """The line's answer, tried again while it is a 5xx or 429, ``max_attempts`` in all."""
        attempt = 1
        while True:
            try:
                with background_work():  # queued behind interactive requests (core/batching)
                    result = await self._execute(endpoint, line.body, tenant)
            except Exception:  # noqa: BLE001 - the executor should not raise; count a failure
                log.exception("batch line %r failed", line.custom_id)
                result = LineResult(status_code=500, body={"error": {
                    "message": "the line failed; the server log has the detail",
                    "type": "internal", "code": 500}})
            if not result.retryable or attempt >= self._settings.max_attempts:
                return result
            await self._sleep(self._settings.retry_backoff_s * attempt)
            attempt += 1

    async def _finish(self, batch_id: str, outcome: BatchStatus) -> None:
        """Write the output and error files, then the final state, in one transaction."""
        found = self._store.batch(batch_id)
        if found is None:
            return
        batch, owned = found
        now = self._stamp()
        if outcome is BatchStatus.COMPLETED and batch.status is not BatchStatus.FINALIZING:
            batch.status, batch.finalizing_at = BatchStatus.FINALIZING, now
            self._save(batch)
        outputs: list[tuple[FileObject, str]] = []
        for file_id, ok in zip(output_file_ids(batch_id), (True, False), strict=True):
            rows = list(self._store.results(batch_id, ok))
            if not rows:
                continue
            size = await asyncio.to_thread(self._files.write, file_id,
                                           (row + b"\n" for row in rows))
            expiry = self._settings.file_expiry_s
            outputs.append((FileObject(
                id=file_id, bytes=size, created_at=now, purpose="batch_output",
                filename=f"{batch_id}_{'output' if ok else 'error'}.jsonl",
                expires_at=None if expiry is None else int(now + expiry),
            ), owned.owner))
            if ok:
                batch.output_file_id = file_id
            else:
                batch.error_file_id = file_id
        batch.status = outcome
        stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.CANCELLED: "cancelled_at",
                 BatchStatus.EXPIRED: "expired_at", BatchStatus.FAILED: "failed_at"}[outcome]
        setattr(batch, stamp, now)
        self._store.finish(batch, outputs)
        self._notify(batch_id)
        log.info("batch %s %s", batch_id, outcome.value,
                 extra={"batch": batch_id, "status": outcome.value})
