"""``JobStore``: files, batches and per-line results in one SQLite database (WAL).

Every answered line becomes one row (``results``, keyed by batch and line number): the
checkpoint a restarted server resumes from. ``record`` only buffers the row; ``flush``
commits every buffered row in one transaction (the runner calls it every few lines or
milliseconds, and every read of results calls it first), so the event loop pays one commit
per group, not one per line. A line answered but not yet flushed when the process dies is
run again after the restart; a line is written once (``INSERT OR IGNORE``), so the output
holds it exactly once either way.

A batch's ``request_counts`` are counted in the database once, then kept up to date by each
flush: counting a 50,000-line batch costs tens of milliseconds of the event loop, and
progress is read after every checkpoint and on every poll.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgspec

from modelyard.core.jobs.model import Batch, BatchStatus, FileObject

__all__ = ["JobStore", "Owned"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL, expires_at INTEGER, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, tenant TEXT NOT NULL, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, doc BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, ok INTEGER NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (batch_id, line));
"""
_UNFINISHED = tuple(s.value for s in BatchStatus if not s.finished)


class Owned(msgspec.Struct, frozen=True):
    """A stored object with the principal that owns it (and its cache tenant)."""

    owner: str
    tenant: str = ""


class JobStore:
    """The durable state of batch jobs; one connection, used from the event loop's thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit survives the process being killed (not a power cut).
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._unsaved: list[tuple[str, int, int, bytes]] = []
        #: batch id -> [lines answered 200, other lines], for batches counted once already.
        self._counts: dict[str, list[int]] = {}

    def close(self) -> None:
        self.flush()
        self._db.close()

    # -- files -----------------------------------------------------------------------------

    def add_file(self, file: FileObject, owner: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
            (file.id, owner, file.bytes, file.created_at, file.expires_at,
             msgspec.json.encode(file)),
        )

    def file(self, file_id: str) -> tuple[FileObject, str] | None:
        row = self._db.execute("SELECT doc, owner FROM files WHERE id = ?", (file_id,)).fetchone()
        return None if row is None else (msgspec.json.decode(row[0], type=FileObject), row[1])

    def files(self, owner: str | None) -> list[tuple[FileObject, str]]:
        """Every file (of ``owner``, or of everyone), newest first."""
        sql = "SELECT doc, owner FROM files"
        rows = (self._db.execute(sql + " WHERE owner = ? ORDER BY created_at DESC, id DESC",
                                 (owner,)) if owner is not None
                else self._db.execute(sql + " ORDER BY created_at DESC, id DESC"))
        return [(msgspec.json.decode(d, type=FileObject), o) for d, o in rows]

    def delete_file(self, file_id: str) -> None:
        self._db.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def stored_bytes(self, owner: str) -> int:
        row = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM files WHERE owner = ?",
                               (owner,)).fetchone()
        return int(row[0])

    def expired_files(self, now: int) -> list[str]:
        rows = self._db.execute(
            "SELECT id FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        )
        return [r[0] for r in rows]

    # -- batches ---------------------------------------------------------------------------

    def add_batch(self, batch: Batch, owned: Owned) -> None:
        self._db.execute(
            "INSERT INTO batches VALUES (?, ?, ?, ?, ?, ?)",
            (batch.id, owned.owner, owned.tenant, batch.status.value, batch.created_at,
             msgspec.json.encode(batch)),
        )

    def save_batch(self, batch: Batch) -> None:
        self._db.execute(
            "UPDATE batches SET status = ?, doc = ? WHERE id = ?",
            (batch.status.value, msgspec.json.encode(batch), batch.id),
        )

    def batch(self, batch_id: str) -> tuple[Batch, Owned] | None:
        row = self._db.execute(
            "SELECT doc, owner, tenant FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
        if row is None:
            return None
        return self._with_counts(msgspec.json.decode(row[0], type=Batch)), Owned(row[1], row[2])

    def batches(self, owner: str | None) -> list[Batch]:
        """Every batch (of ``owner``, or of everyone), newest first."""
        sql = "SELECT doc FROM batches"
        rows = (self._db.execute(sql + " WHERE owner = ? ORDER BY created_at DESC, id DESC",
                                 (owner,)) if owner is not None
                else self._db.execute(sql + " ORDER BY created_at DESC, id DESC"))
        return [self._with_counts(msgspec.json.decode(r[0], type=Batch)) for r in rows]

    def unfinished(self) -> list[str]:
        marks = ",".join("?" * len(_UNFINISHED))
        rows = self._db.execute(
            f"SELECT id FROM batches WHERE status IN ({marks}) ORDER BY created_at, id",
            _UNFINISHED,
        )
        return [r[0] for r in rows]

    def running_count(self, owner: str) -> int:
        marks = ",".join("?" * len(_UNFINISHED))
        row = self._db.execute(
            f"SELECT COUNT(*) FROM batches WHERE owner = ? AND status IN ({marks})",
            (owner, *_UNFINISHED),
        ).fetchone()
        return int(row[0])

    def file_in_use(self, file_id: str) -> bool:
        """Whether an unfinished batch reads ``file_id``."""
        for batch_id in self.unfinished():
            found = self.batch(batch_id)
            if found is not None and found[0].input_file_id == file_id:
                return True
        return False

    # -- per-line results ------------------------------------------------------------------

    def record(self, batch_id: str, line: int, ok: bool, payload: bytes) -> None:
        """Buffer one answered line; ``flush`` makes it a checkpoint."""
        self._unsaved.append((batch_id, line, int(ok), payload))

    @property
    def unsaved(self) -> int:
        """Lines recorded but not flushed yet."""
        return len(self._unsaved)

    def flush(self) -> set[str]:
        """Commit the buffered lines in one transaction; the batches they belong to."""
        if not self._unsaved:
            return set()
        rows, self._unsaved = self._unsaved, []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            written = self._db.executemany(
                "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?)", rows
            ).rowcount
        except BaseException:
            self._db.execute("ROLLBACK")
            self._unsaved[:0] = rows
            raise
        self._db.execute("COMMIT")
        batch_ids = {row[0] for row in rows}
        if written != len(rows):  # some were there already: count those batches afresh
            for batch_id in batch_ids:
                self._counts.pop(batch_id, None)
            return batch_ids
        for batch_id, _, ok, _ in rows:
            counts = self._counts.get(batch_id)
            if counts is not None:
                counts[1 - ok] += 1
        return batch_ids

    def done_lines(self, batch_id: str) -> set[int]:
        self.flush()
        rows = self._db.execute("SELECT line FROM results WHERE batch_id = ?", (batch_id,))
        return {r[0] for r in rows}

    def results(self, batch_id: str, ok: bool) -> Iterator[bytes]:
        """The recorded payloads that succeeded (``ok``) or failed, in line order."""
        self.flush()
        rows = self._db.execute(
            "SELECT payload FROM results WHERE batch_id = ? AND ok = ? ORDER BY line",
            (batch_id, int(ok)),
        ).fetchall()
        return (r[0] for r in rows)

    def finish(self, batch: Batch, outputs: list[tuple[FileObject, str]]) -> None:
        """Record the output files and the batch's final state in one transaction."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for file, owner in outputs:
                self.add_file(file, owner)
            self.save_batch(batch)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _with_counts(self, batch: Batch) -> Batch:
        self.flush()
        counts = self._counts.get(batch.id)
        if counts is None:
            rows = dict(self._db.execute(
                "SELECT ok, COUNT(*) FROM results WHERE batch_id = ? GROUP BY ok", (batch.id,)
            ).fetchall())
            counts = self._counts[batch.id] = [int(rows.get(1, 0)), int(rows.get(0, 0))]
        batch.request_counts.completed, batch.request_counts.failed = counts
        return batch
