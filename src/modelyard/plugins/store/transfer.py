"""Resumable, verified HTTP(S) downloads into the store.

The expected digest comes from the URL's ``#sha256=HEX`` / ``#blake3=HEX`` fragment or, when
the URL has none, from the server: ``Repr-Digest: sha-256=:BASE64:`` (RFC 9530),
``Digest: SHA-256=BASE64`` (RFC 3230) or ``X-Checksum-Sha256: HEX`` (Artifactory, Nexus).
Without either the download is refused before its body is read.

Bytes go to ``tmp/dl-<key>.part``. An interrupted transfer keeps that file; the next pull
asks for the rest (``Range``, guarded by ``If-Range`` with the first response's validator).
A digest mismatch or a full disk deletes it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import msgspec

from modelyard.core.errors import ModelLoadError
from modelyard.core.integrity import Pin, new_hasher
from modelyard.plugins.store.store import ByteProgress, ModelStore, StoredFile, write_failed

__all__ = ["check_url", "fetch", "server_digest"]

_TIMEOUT = httpx.Timeout(30.0)


class _Resume(msgspec.Struct):
    url: str
    validator: str | None = None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: str, *, allow_insecure: bool, source: str) -> httpx.URL:
    """The URL, refused when it is not https (plain http: loopback or ``allow_insecure``)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        raise ModelLoadError(f"model source {source!r} is not a valid URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ModelLoadError(f"model source {source!r} is not an http(s) URL")
    if parsed.scheme == "http" and not allow_insecure and not is_loopback(parsed.host):
        raise ModelLoadError(
            f"model source {source!r}: plain http is allowed only for loopback hosts; use "
            "https, or pass --allow-insecure to modelyard pull"
        )
    return parsed


def server_digest(headers: httpx.Headers) -> Pin | None:
    """The sha256 the server states for the whole file, from the headers we accept."""
    for header, separator in (("repr-digest", "="), ("digest", "=")):
        for item in headers.get(header, "").split(","):
            algorithm, _, value = item.strip().partition(separator)
            if algorithm.strip().lower() != "sha-256":
                continue
            try:
                raw = base64.b64decode(value.strip().strip(":"), validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) == 32:
                return Pin("sha256", raw.hex())
    hexed = headers.get("x-checksum-sha256", "").strip().lower()
    if len(hexed) == 64 and all(c in "0123456789abcdef" for c in hexed):
        return Pin("sha256", hexed)
    return None


def fetch(
    url: str,
    *,
    pin: Pin | None,
    store: ModelStore,
    source: str,
    relative: str,
    progress: ByteProgress,
    allow_insecure: bool = False,
) -> StoredFile:
    """Download ``url`` into a blob, verified against ``pin`` or the server's digest."""
    check_url(url, allow_insecure=allow_insecure, source=source)
    key = hashlib.sha256(f"{url}|{pin}".encode()).hexdigest()[:32]
    partial = store.scratch(f"dl-{key}.part")
    with _exclusive(partial, source), httpx.Client(
        follow_redirects=True, timeout=_TIMEOUT
    ) as client:
        for _ in range(2):  # a second round starts over when the server cannot resume
            stored = _attempt(client, url, pin, store, partial, source, relative, progress,
                              allow_insecure)
            if stored is not None:
                return stored
    raise ModelLoadError(f"model source {source!r}: the server cannot resume the download")


def _attempt(
    client: httpx.Client, url: str, pin: Pin | None, store: ModelStore, partial: Path,
    source: str, relative: str, progress: ByteProgress, allow_insecure: bool,
) -> StoredFile | None:
    resume = _read_resume(partial, url)
    offset = partial.stat().st_size if partial.exists() and resume is not None else 0
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if resume is not None and resume.validator:
            headers["If-Range"] = resume.validator
    try:
        with client.stream("GET", url, headers=headers) as response:
            if response.status_code == 416 or (offset and response.status_code == 200):
                _discard(partial)  # stale or unresumable: start over
                if response.status_code == 416:
                    return None
                offset = 0
            _check_response(response, source, offset, allow_insecure)
            expected = pin or server_digest(response.headers)
            if expected is None:
                raise ModelLoadError(
                    f"model source {source!r}: the server sends no digest (Repr-Digest, Digest "
                    "or X-Checksum-Sha256); pin the URL: add #sha256=HEX"
                )
            if expected.algorithm == "sha256" and store.blob(expected.hex).exists():
                # the URL answers and the store holds its content already: skip the body
                size = store.blob(expected.hex).stat().st_size
                return StoredFile(path=relative, size=size, sha256=expected.hex)
            total = _total_size(response, offset)
            validator = response.headers.get("etag") or response.headers.get("last-modified")
            _write_resume(partial, _Resume(url=url, validator=validator))
            hashers = _seeded_hashers(partial, offset, expected)
            size = _receive(response, partial, offset, hashers, relative, total, progress, source)
    except httpx.TransportError as exc:
        raise ModelLoadError(f"model source {source!r}: {_network_problem(exc)}") from None
    if total is not None and size != total:
        raise ModelLoadError(
            f"model source {source!r}: the transfer stopped at {size} of {total} bytes; "
            "run the pull again to resume"
        )
    actual = hashers[expected.algorithm].hexdigest()
    if actual != expected.hex:
        _discard(partial)
        raise ModelLoadError(
            f"model source {source!r}: {expected.algorithm} mismatch: expected {expected.hex}, "
            f"actual {actual}"
        )
    sha256 = hashers["sha256"].hexdigest()
    try:
        store.commit_blob(partial, sha256)
    except OSError as exc:
        _discard(partial)
        raise write_failed(exc, source) from None
    _discard_resume(partial)
    blake3 = actual if expected.algorithm == "blake3" else None
    return StoredFile(path=relative, size=size, sha256=sha256, blake3=blake3)


def _check_response(
    response: httpx.Response, source: str, offset: int, allow_insecure: bool
) -> None:
    status = response.status_code
    if status >= 400:
        what = "not found" if status == 404 else "refused" if status < 500 else "server error"
        raise ModelLoadError(
            f"model source {source!r}: {what} (HTTP {status} from {response.url.host})"
        )
    if status not in (200, 206):
        raise ModelLoadError(f"model source {source!r}: unexpected HTTP {status}")
    # A redirect must not downgrade to plain http on the open network.
    check_url(str(response.url), allow_insecure=allow_insecure, source=source)
    encoding = response.headers.get("content-encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise ModelLoadError(
            f"model source {source!r}: the server sent {encoding}-encoded bytes; ranges and "
            "digests need the file as it is"
        )
    if status == 206:
        start = response.headers.get("content-range", "").removeprefix("bytes ").split("-")[0]
        if start != str(offset):
            raise ModelLoadError(
                f"model source {source!r}: the server resumed at byte {start}, not {offset}"
            )


def _total_size(response: httpx.Response, offset: int) -> int | None:
    if response.status_code == 206:
        whole = response.headers.get("content-range", "").rpartition("/")[2]
        return int(whole) if whole.isdigit() else None
    length = response.headers.get("content-length", "")
    return int(length) if length.isdigit() else None


def _seeded_hashers(partial: Path, offset: int, expected: Pin) -> dict[str, Any]:
    hashers = {"sha256": new_hasher("sha256")}
    if expected.algorithm != "sha256":
        hashers[expected.algorithm] = new_hasher(expected.algorithm)
    if offset:
        with partial.open("rb") as f:
            while chunk := f.read(1 << 20):
                for h in hashers.values():
                    h.update(chunk)
    return hashers


def _receive(
    response: httpx.Response, partial: Path, offset: int, hashers: dict[str, Any],
    label: str, total: int | None, progress: ByteProgress, source: str,
) -> int:
    done = offset
    progress(label, done, total)
    try:
        with _open_partial(partial, append=bool(offset)) as out:
            try:
                for chunk in response.iter_raw():
                    out.write(chunk)
                    for h in hashers.values():
                        h.update(chunk)
                    done += len(chunk)
                    progress(label, done, total)
            finally:  # what arrived stays on disk for the next pull to resume from
                out.flush()
                os.fsync(out.fileno())
    except OSError as exc:
        _discard(partial)
        raise write_failed(exc, source) from None
    except httpx.TransportError as exc:
        raise ModelLoadError(
            f"model source {source!r}: the transfer was interrupted after {done} bytes "
            f"({_network_problem(exc)}); run the pull again to resume"
        ) from None
    return done


def _open_partial(partial: Path, *, append: bool) -> BinaryIO:
    """The partial file, for appending after a resume or written afresh."""
    return partial.open("ab" if append else "wb")


def _network_problem(exc: httpx.TransportError) -> str:
    # By exception class, never by the library's message text.
    if isinstance(exc, httpx.ConnectError):
        return "cannot connect to the server"
    if isinstance(exc, httpx.TimeoutException):
        return "the server did not answer in time"
    if isinstance(exc, httpx.RemoteProtocolError):
        return "the server closed the connection early"
    return "network error"


def _resume_path(partial: Path) -> Path:
    return partial.with_suffix(".json")


def _read_resume(partial: Path, url: str) -> _Resume | None:
    try:
        resume = msgspec.json.decode(_resume_path(partial).read_bytes(), type=_Resume)
    except (OSError, msgspec.DecodeError):
        return None
    return resume if resume.url == url else None


def _write_resume(partial: Path, resume: _Resume) -> None:
    _resume_path(partial).write_bytes(msgspec.json.encode(resume))


def _discard_resume(partial: Path) -> None:
    _resume_path(partial).unlink(missing_ok=True)


def _discard(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _discard_resume(partial)


@contextmanager
def _exclusive(partial: Path, source: str) -> Iterator[None]:
    """One pull of a URL at a time: a second one would write the same partial file."""
    lock_path = partial.with_suffix(".lock")
    with lock_path.open("a") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; concurrent pulls are the user's care
            yield
            return
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ModelLoadError(
                f"model source {source!r}: another pull of it is running"
            ) from None
        try:
            yield
        finally:
            if not partial.exists():  # finished or discarded: nothing left to guard
                lock_path.unlink(missing_ok=True)
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
