"""Content digests and pins: ``#sha256=HEX`` on a source, checked against what it resolved to.

A file's digest is the digest of its bytes. A directory's is the sha256 of its listing: one
line ``"<sha256 of the file>  <relative/posix/path>\\n"`` per file, sorted by path (the
output of ``sha256sum`` run over the sorted files), so one digest pins a whole model folder.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelyard.core.errors import ConfigError, ModelLoadError

__all__ = [
    "Algorithm",
    "Pin",
    "check_pin",
    "content_digest",
    "file_digest",
    "listing_digest",
    "new_hasher",
    "split_pin",
    "tree_files",
    "with_pin",
]

Algorithm = Literal["sha256", "blake3"]
_PIN = re.compile(r"#(?P<algorithm>sha256|blake3)=(?P<hex>[0-9A-Fa-f]{64})$")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Pin:
    """An expected digest: the algorithm and 64 lower-case hex digits."""

    algorithm: Algorithm
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    @property
    def fragment(self) -> str:
        return f"#{self.algorithm}={self.hex}"


def split_pin(source: str) -> tuple[str, Pin | None]:
    """``"x.gguf#sha256=AB.."`` -> ``("x.gguf", Pin)``; a source without a pin comes back whole."""
    match = _PIN.search(source)
    if match is None:
        return source, None
    algorithm: Algorithm = "sha256" if match["algorithm"] == "sha256" else "blake3"
    return source[: match.start()], Pin(algorithm, match["hex"].lower())


def with_pin(source: str, sha256: str | None, where: str = "$.sha256") -> str:
    """The source with a config's ``sha256`` as its pin; a different pin on it is an error."""
    if sha256 is None:
        return source
    base, pin = split_pin(source)
    wanted = Pin("sha256", sha256.lower())
    if pin is not None and pin != wanted:
        raise ConfigError(f"{where}: sha256 {wanted.hex} disagrees with the source's pin {pin}")
    return base + wanted.fragment


def new_hasher(algorithm: Algorithm) -> Any:
    """A hashlib-style object (``update``, ``hexdigest``); blake3 needs the ``blake3`` package."""
    if algorithm == "sha256":
        return hashlib.sha256()
    try:
        import blake3  # optional: pip install 'modelyard[cache]'
    except ImportError:
        raise ModelLoadError(
            "a blake3 pin needs the blake3 package (pip install 'modelyard[cache]')"
        ) from None
    return blake3.blake3()


def file_digest(path: Path, algorithm: Algorithm = "sha256") -> str:
    hasher = new_hasher(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def tree_files(root: Path) -> list[tuple[str, Path]]:
    """Every file under ``root`` as ``(relative posix path, path)``, sorted by the former."""
    found = [(p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file()]
    return sorted(found)


def listing_digest(entries: Iterable[tuple[str, str]]) -> str:
    """The digest of a folder from ``(relative path, sha256 hex)`` of each of its files."""
    hasher = hashlib.sha256()
    for relative, digest in sorted(entries):
        hasher.update(f"{digest}  {relative}\n".encode())
    return hasher.hexdigest()


def content_digest(path: Path, algorithm: Algorithm = "sha256") -> str:
    """A file's digest, or a directory's listing digest (sha256 only)."""
    if not path.is_dir():
        return file_digest(path, algorithm)
    if algorithm != "sha256":
        raise ModelLoadError(f"a {algorithm} pin names a single file; {path.name} is a folder")
    return listing_digest((rel, file_digest(p)) for rel, p in tree_files(path))


def check_pin(path: Path, pin: Pin | None, source: str) -> Path:
    """``path`` when its content matches ``pin`` (or there is none); else ``ModelLoadError``."""
    if pin is None:
        return path
    actual = content_digest(path, pin.algorithm)
    if actual != pin.hex:
        raise ModelLoadError(
            f"model source {source!r}: {pin.algorithm} mismatch: expected {pin.hex}, "
            f"actual {actual}"
        )
    return path
