"""The content-addressed model store: blobs named by their sha256, one manifest per model.

Layout under ``<cache_dir>/store``::

    blobs/sha256/<hex>      read-only file contents, one per digest, shared between models
    manifests/<name>.json   a Manifest: source, revision, files (path, size, sha256), when
    models/<name>/<path>    hard links to the blobs under the file names a backend expects
    tmp/                    downloads in progress (kept to resume), staging; never served

Everything lands by writing a temporary name, fsync, then rename: a crash or a full disk
leaves at most a file in ``tmp/``, never a blob, manifest or model folder half written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from msgspec import Struct

from modelyard.core.errors import ModelLoadError, ModelNotFoundError
from modelyard.core.integrity import Pin, check_pin, file_digest, listing_digest

__all__ = [
    "ByteProgress",
    "Manifest",
    "ModelStore",
    "Pulled",
    "StoredFile",
    "disk_full",
    "manifest_digest",
    "now_iso",
    "valid_name",
    "write_failed",
]

#: ``progress(label, done_bytes, total_bytes or None)``, called as bytes arrive.
ByteProgress = Callable[[str, int, int | None], None]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_CHUNK = 1 << 20


class StoredFile(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One file of a model: where it sits in the model folder, its size and digests."""

    path: str
    size: int
    sha256: str
    blake3: str | None = None


class Manifest(Struct, frozen=True, kw_only=True):
    """What a pulled model is: ``models/<name>/<entry>`` is the path a backend loads."""

    name: str
    #: The source as pulled, without a ``#sha256=`` pin (``hf:org/repo/file.gguf``, a URL...).
    source: str
    #: The upstream revision: a Hub commit, ``dist==version`` of a wheel; empty when none.
    revision: str = ""
    #: The file a backend loads, relative to the model folder; empty: the folder itself.
    entry: str = ""
    #: sha256 of the entry file, or the folder's listing digest (see core.integrity).
    digest: str
    files: list[StoredFile]
    pulled_at: str
    schema: int = 1

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Pulled:
    """What a puller brought into the store's blobs; ``pull`` then writes the manifest."""

    files: list[StoredFile]
    revision: str
    entry: str


def valid_name(name: str) -> bool:
    return _NAME.match(name) is not None


def disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


def write_failed(exc: OSError, source: str) -> ModelLoadError:
    """The error for a write into the store that failed (a full disk above all)."""
    if disk_full(exc):
        return ModelLoadError(
            f"model source {source!r}: the disk holding the model store is full; free space "
            "and pull again"
        )
    reason = os.strerror(exc.errno) if exc.errno else "I/O error"
    return ModelLoadError(f"model source {source!r}: cannot write to the model store ({reason})")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def manifest_digest(files: list[StoredFile], entry: str) -> str:
    if entry:
        return next(f.sha256 for f in files if f.path == entry)
    return listing_digest((f.path, f.sha256) for f in files)


class ModelStore:
    """One store directory; every method is safe to call from a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def under(cls, cache_dir: Path) -> ModelStore:
        return cls(cache_dir / "store")

    # -- blobs ---------------------------------------------------------------------------

    def blob(self, sha256: str) -> Path:
        return self.root / "blobs" / "sha256" / sha256

    def has(self, stored: StoredFile) -> bool:
        try:
            return self.blob(stored.sha256).stat().st_size == stored.size
        except OSError:
            return False

    def scratch(self, key: str) -> Path:
        """A path under ``tmp/`` for work in progress (created on demand)."""
        folder = self.root / "tmp"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / key

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh folder under ``tmp/``, removed afterwards whatever happens."""
        folder = self.scratch(f"stage-{uuid.uuid4().hex}")
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def commit_blob(self, written: Path, sha256: str) -> Path:
        """Move a complete, verified file from ``tmp/`` into ``blobs/`` (fsync, rename)."""
        target = self.blob(sha256)
        if target.exists():  # the same content arrived before: keep the one we have
            written.unlink(missing_ok=True)
            return target
        _fsync_file(written)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written, target)
        target.chmod(0o444)  # a stray write through a model folder's link must fail
        _fsync_dir(target.parent)
        return target

    def add_file(
        self, path: Path, relative: str, *, label: str, progress: ByteProgress, link: bool = False
    ) -> StoredFile:
        """Store a file's content: hard-linked when ``link`` (an immutable cache), else copied."""
        written = self.scratch(f"add-{uuid.uuid4().hex}")
        try:
            # A cache's snapshot entry is a symlink: link the file it names, not the link.
            if link and _try_link(path.resolve(), written):
                sha256 = file_digest(written)
            else:
                sha256 = _copy_hashing(path, written, label, progress)
            size = written.stat().st_size
            self.commit_blob(written, sha256)
        except OSError:
            written.unlink(missing_ok=True)
            raise
        return StoredFile(path=relative, size=size, sha256=sha256)

    # -- manifests -----------------------------------------------------------------------

    def _manifest_path(self, name: str) -> Path:
        return self.root / "manifests" / f"{name}.json"

    def model_dir(self, name: str) -> Path:
        return self.root / "models" / name

    def path_of(self, manifest: Manifest) -> Path:
        folder = self.model_dir(manifest.name)
        return folder / manifest.entry if manifest.entry else folder

    def manifest(self, name: str) -> Manifest | None:
        if not valid_name(name):
            return None
        try:
            return msgspec.json.decode(self._manifest_path(name).read_bytes(), type=Manifest)
        except (OSError, msgspec.DecodeError):
            return None

    def manifests(self) -> list[Manifest]:
        folder = self.root / "manifests"
        if not folder.is_dir():
            return []
        found = (self.manifest(p.stem) for p in sorted(folder.glob("*.json")))
        return [m for m in found if m is not None]

    def find(self, source: str) -> Manifest | None:
        """The most recently pulled model of ``source`` (a source without its pin)."""
        matches = [m for m in self.manifests() if m.source == source]
        return max(matches, key=lambda m: m.pulled_at) if matches else None

    def save(self, manifest: Manifest) -> Path:
        """Link the model folder, then write the manifest; returns the path a backend loads."""
        missing = [f.path for f in manifest.files if not self.has(f)]
        if missing:
            raise ModelLoadError(f"model {manifest.name!r}: blobs missing for {missing}")
        self._link_tree(manifest)
        _write_atomic(self._manifest_path(manifest.name), msgspec.json.format(
            msgspec.json.encode(manifest), indent=2
        ))
        return self.path_of(manifest)

    def _link_tree(self, manifest: Manifest) -> None:
        final = self.model_dir(manifest.name)
        fresh = final.parent / f".{manifest.name}.{uuid.uuid4().hex}"
        try:
            for stored in manifest.files:
                target = fresh / stored.path
                target.parent.mkdir(parents=True, exist_ok=True)
                if not _try_link(self.blob(stored.sha256), target):
                    shutil.copyfile(self.blob(stored.sha256), target)
            old = final.parent / f".{manifest.name}.old-{uuid.uuid4().hex}"
            if final.exists():
                os.replace(final, old)
            os.replace(fresh, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)

    # -- load, remove, verify ------------------------------------------------------------

    def check(self, manifest: Manifest, pin: Pin | None, source: str) -> Path:
        """The path to load, after checking sizes against the manifest and any pin by re-hash."""
        for stored in manifest.files:
            if not self.has(stored):
                raise ModelLoadError(
                    f"model source {source!r}: the store's copy of {stored.path} is missing "
                    f"or not {stored.size} bytes; run: modelyard pull {manifest.source}"
                )
        path = self.path_of(manifest)
        if not all((self.model_dir(manifest.name) / f.path).exists() for f in manifest.files):
            self._link_tree(manifest)
        return check_pin(path, pin, source)

    def remove(self, name: str) -> tuple[int, int]:
        """Forget model ``name``; delete the blobs no other model uses. (blobs, bytes) freed."""
        manifest = self.manifest(name)
        if manifest is None:
            raise ModelNotFoundError(f"no model named {name!r} in the store")
        self._manifest_path(name).unlink()
        shutil.rmtree(self.model_dir(name), ignore_errors=True)
        return self.drop_unused(manifest.files)

    def drop_unused(self, files: list[StoredFile]) -> tuple[int, int]:
        """Delete those of ``files``' blobs that no manifest refers to."""
        used = {f.sha256 for m in self.manifests() for f in m.files}
        count = freed = 0
        for stored in {f.sha256: f for f in files}.values():
            blob = self.blob(stored.sha256)
            if stored.sha256 in used or not blob.exists():
                continue
            blob.unlink()
            count, freed = count + 1, freed + stored.size
        return count, freed

    def verify(self, manifest: Manifest, progress: ByteProgress) -> list[str]:
        """Re-hash every blob of ``manifest``; each problem found, as a sentence."""
        problems: list[str] = []
        for stored in manifest.files:
            blob = self.blob(stored.sha256)
            if not blob.exists():
                problems.append(f"{stored.path}: blob {stored.sha256[:12]} is missing")
                continue
            size = blob.stat().st_size
            if size != stored.size:
                problems.append(f"{stored.path}: {size} bytes, expected {stored.size}")
                continue
            actual = _hash_with_progress(blob, stored.path, progress)
            if actual != stored.sha256:
                problems.append(
                    f"{stored.path}: sha256 mismatch: expected {stored.sha256}, actual {actual}"
                )
        return problems


def _try_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _copy_hashing(source: Path, target: Path, label: str, progress: ByteProgress) -> str:
    hasher = hashlib.sha256()
    total, done = source.stat().st_size, 0
    with source.open("rb") as src, target.open("wb") as dst:
        while chunk := src.read(_CHUNK):
            dst.write(chunk)
            hasher.update(chunk)
            done += len(chunk)
            progress(label, done, total)
    return hasher.hexdigest()


def _hash_with_progress(path: Path, label: str, progress: ByteProgress) -> str:
    hasher = hashlib.sha256()
    total, done = path.stat().st_size, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
            done += len(chunk)
            progress(label, done, total)
    return hasher.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # Windows cannot open a directory; its rename is durable enough
        return
    _fsync_file(path)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with temp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
