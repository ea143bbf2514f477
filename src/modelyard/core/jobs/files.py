"""``FileStore``: the bytes of uploaded and output files, one file each under the data dir."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

__all__ = ["FileStore"]

_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")


class FileStore:
    """Files written whole (a temporary name, fsync, rename): a reader never sees half."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, file_id: str) -> Path:
        if not _ID.match(file_id):  # ids are ours; never let one name another path
            raise ValueError(f"not a file id: {file_id!r}")
        return self.root / file_id

    def write(self, file_id: str, chunks: Iterable[bytes]) -> int:
        """Write the file atomically; returns its size."""
        target = self.path(file_id)
        partial = target.with_name(target.name + ".partial")
        size = 0
        with partial.open("wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, target)
        return size

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
