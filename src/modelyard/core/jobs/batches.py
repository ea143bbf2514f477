"""``BatchJobs``: the Files and Batch operations every caller (HTTP, CLI) goes through.

Who sees what: a principal sees, reads, deletes and cancels only its own files and batches;
an ``admin`` sees everyone's. Quotas (stored bytes, unfinished batches) are per principal.
The store opens on first use, or at start when a previous run left one (to resume its jobs).
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from modelyard.core.auth import Principal
from modelyard.core.errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    ModelNotFoundError,
    ModelyardError,
    NotFoundError,
    PayloadTooLargeError,
    RateLimitedError,
)
from modelyard.core.jobs.files import FileStore
from modelyard.core.jobs.inputs import parse_input
from modelyard.core.jobs.model import (
    ENDPOINTS,
    Batch,
    BatchStatus,
    FileObject,
    InputLine,
    LineExecutor,
    RequestCounts,
)
from modelyard.core.jobs.runner import BatchRunner, ProgressListener, Sleep
from modelyard.core.jobs.settings import BatchSettings
from modelyard.core.jobs.store import JobStore, Owned

__all__ = ["BatchJobs", "ModelCatalog", "Page"]

_WINDOW = re.compile(r"^(\d{1,4})h$")
_DB = "jobs.sqlite"


class ModelCatalog(Protocol):
    """What batch jobs ask about models: whether one exists, and how long its queue is."""

    def known(self, model: str) -> bool: ...

    def queue_depth(self, model: str) -> int: ...


#: Checks one line's body as its endpoint would (types, limits); raises a ModelyardError.
CheckBody = Callable[[str, InputLine], None]


_T = TypeVar("_T", FileObject, Batch)


class Page(Generic[_T]):
    """One page of a list, newest first, and whether more follow."""

    def __init__(self, data: list[_T], has_more: bool) -> None:
        self.data: list[_T] = data
        self.has_more = has_more


def _is_admin(principal: Principal) -> bool:
    return "admin" in principal.roles


class BatchJobs:
    """Files, batches and the runner of one data directory."""

    def __init__(
        self,
        settings: BatchSettings,
        data_dir: Path,
        execute: LineExecutor,
        models: ModelCatalog,
        *,
        check_body: CheckBody | None = None,
        wall_clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self._execute = execute
        self._models = models
        self._check_body = check_body
        self._now = wall_clock
        self._sleep = sleep
        self._store: JobStore | None = None
        self._files: FileStore | None = None
        self._runner: BatchRunner | None = None
        self._stopped = False
        #: Batch progress and completion hooks (an event bus subscribes here); each is told
        #: the batch after every checkpoint and status change.
        self.listeners: list[ProgressListener] = []

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume the jobs a previous run left unfinished (nothing to do without a store)."""
        self._stopped = False
        if (self.data_dir / _DB).exists():
            self._open().resume_all()
            self._sweep()

    async def stop(self) -> None:
        self._stopped = True
        if self._runner is not None:
            await self._runner.stop()
        if self._store is not None:
            self._store.close()
        self._store = self._files = self._runner = None

    def _open(self) -> BatchRunner:
        if self._runner is None:
            self._store = JobStore(self.data_dir / _DB)
            self._files = FileStore(self.data_dir / "files")
            self._runner = BatchRunner(
                self._store, self._files, self.settings, self._execute,
                queue_depth=self._models.queue_depth, wall_clock=self._now, sleep=self._sleep,
            )
            self._runner.listeners = self.listeners
        return self._runner

    @property
    def _db(self) -> JobStore:
        self._open()
        assert self._store is not None
        return self._store

    @property
    def _disk(self) -> FileStore:
        self._open()
        assert self._files is not None
        return self._files

    def _stamp(self) -> int:
        return int(self._now())

    def _sweep(self) -> None:
        """Delete expired files (those a running batch reads are kept until it ends)."""
        for file_id in self._db.expired_files(self._stamp()):
            if not self._db.file_in_use(file_id):
                self._db.delete_file(file_id)
                self._disk.delete(file_id)

    # -- files -----------------------------------------------------------------------------

    async def create_file(
        self, principal: Principal, filename: str, purpose: str, content: bytes
    ) -> FileObject:
        if purpose != "batch":
            raise BadRequestError(f"purpose must be 'batch', not {purpose!r}")
        if len(content) > self.settings.max_file_bytes:
            raise PayloadTooLargeError(
                f"the file has {len(content)} bytes, over the limit of "
                f"{self.settings.max_file_bytes}")
        self._sweep()
        quota = self.settings.max_stored_bytes_per_principal
        if quota is not None and self._db.stored_bytes(principal.id) + len(content) > quota:
            raise RateLimitedError(
                f"storage quota exceeded: {quota} bytes per principal; delete files first")
        now = self._stamp()
        expiry = self.settings.file_expiry_s
        file = FileObject(
            id="file-" + uuid.uuid4().hex, bytes=len(content), created_at=now,
            filename=filename or "upload.jsonl", purpose=purpose,
            expires_at=None if expiry is None else int(now + expiry),
        )
        await asyncio.to_thread(self._disk.write, file.id, [content])
        self._db.add_file(file, principal.id)
        return file

    def files(
        self, principal: Principal, *, purpose: str | None = None, limit: int = 10000,
        after: str | None = None, order: str = "desc",
    ) -> Page[FileObject]:
        owner = None if _is_admin(principal) else principal.id
        now = self._stamp()
        found = [f for f, _ in self._db.files(owner)
                 if (purpose is None or f.purpose == purpose)
                 and (f.expires_at is None or f.expires_at > now)]
        if order == "asc":
            found.reverse()
        return _page(found, limit, after)

    def file(self, principal: Principal, file_id: str) -> FileObject:
        return self._visible_file(principal, file_id)[0]

    async def file_content(self, principal: Principal, file_id: str) -> bytes:
        self._visible_file(principal, file_id)
        return await asyncio.to_thread(self._disk.read, file_id)

    def delete_file(self, principal: Principal, file_id: str) -> None:
        self._visible_file(principal, file_id)
        if self._db.file_in_use(file_id):
            raise ConflictError(f"file {file_id!r} is the input of a batch still running")
        self._db.delete_file(file_id)
        self._disk.delete(file_id)

    def _visible_file(self, principal: Principal, file_id: str) -> tuple[FileObject, str]:
        found = self._db.file(file_id) if file_id.startswith("file-") else None
        if found is None or not (_is_admin(principal) or found[1] == principal.id) or (
            found[0].expires_at is not None and found[0].expires_at <= self._stamp()
        ):
            raise NotFoundError(f"no file {file_id!r}")
        return found

    # -- batches ---------------------------------------------------------------------------

    async def create_batch(
        self, principal: Principal, *, input_file_id: str, endpoint: str,
        completion_window: str = "24h", metadata: dict[str, str] | None = None,
    ) -> Batch:
        """Check the input file line by line (400 naming the line), then queue the job."""
        if endpoint not in ENDPOINTS:
            raise BadRequestError(
                f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint!r}")
        window = _WINDOW.match(completion_window)
        if window is None or int(window.group(1)) < 1:
            raise BadRequestError(
                f"completion_window must be hours such as '24h', not {completion_window!r}")
        quota = self.settings.max_running_batches_per_principal
        if quota is not None and self._db.running_count(principal.id) >= quota:
            raise RateLimitedError(
                f"batch quota exceeded: {quota} unfinished batches per principal")
        try:
            self._visible_file(principal, input_file_id)
        except NotFoundError:
            raise BadRequestError(f"input_file_id: no file {input_file_id!r}") from None
        data = await asyncio.to_thread(self._disk.read, input_file_id)
        lines = parse_input(data, endpoint, self.settings,
                            lambda line: self._check_line(principal, endpoint, line))
        now = self._stamp()
        batch = Batch(
            id="batch_" + uuid.uuid4().hex, endpoint=endpoint, input_file_id=input_file_id,
            completion_window=completion_window, status=BatchStatus.VALIDATING,
            created_at=now, expires_at=now + int(window.group(1)) * 3600,
            request_counts=RequestCounts(total=len(lines)), metadata=metadata,
        )
        self._db.add_batch(batch, Owned(principal.id, principal.tenant))
        if not self._stopped:
            self._open().launch(batch.id)
        return batch

    def _check_line(self, principal: Principal, endpoint: str, line: InputLine) -> None:
        if not self._models.known(line.model):
            raise ModelNotFoundError(f"unknown model {line.model!r}")
        if not principal.may_use(line.model):
            raise ForbiddenError(f"not allowed to use model {line.model!r}")
        if self._check_body is not None:
            self._check_body(endpoint, line)

    def batch(self, principal: Principal, batch_id: str) -> Batch:
        found = self._db.batch(batch_id) if batch_id.startswith("batch_") else None
        if found is None or not (_is_admin(principal) or found[1].owner == principal.id):
            raise NotFoundError(f"no batch {batch_id!r}")
        return found[0]

    def batches(
        self, principal: Principal, *, limit: int = 20, after: str | None = None
    ) -> Page[Batch]:
        owner = None if _is_admin(principal) else principal.id
        return _page(self._db.batches(owner), limit, after)

    def cancel(self, principal: Principal, batch_id: str) -> Batch:
        """Ask a job to stop: ``cancelling`` now, ``cancelled`` once its lines have left."""
        batch = self.batch(principal, batch_id)
        if batch.status.finished:
            raise ConflictError(f"batch {batch_id!r} is already {batch.status.value}")
        if batch.status is not BatchStatus.CANCELLING:
            batch.status, batch.cancelling_at = BatchStatus.CANCELLING, self._stamp()
            self._db.save_batch(batch)
        if not self._stopped:
            self._open().cancel(batch_id)
        return batch

    async def wait(self, batch_id: str) -> None:
        """Until the job's task ends (the CLI and tests; the HTTP API polls)."""
        await self._open().wait(batch_id)


def _page(items: list[_T], limit: int, after: str | None) -> Page[_T]:
    if after is not None:
        ids = [i.id for i in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return Page(items[:limit], len(items) > limit)


def known_model(resolve: Callable[[str], object]) -> Callable[[str], bool]:
    """``known`` from a resolver that raises ModelNotFoundError for an unknown name."""

    def known(model: str) -> bool:
        try:
            resolve(model)
        except ModelNotFoundError:
            return False
        except ModelyardError:
            return True  # known, just not ready now
        return True

    return known
