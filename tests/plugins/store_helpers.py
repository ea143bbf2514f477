"""A local HTTP server for the store tests: files with ranges, a Hub lookalike, injected faults.

Nothing here reaches the internet: the server binds 127.0.0.1 on a free port.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal

__all__ = ["Fault", "HfRepo", "LocalServer", "sha256"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True)
class Fault:
    """What the next GET of a path does instead of answering normally."""

    kind: Literal["truncate", "status", "ignore-range"]
    #: truncate: bytes of the body sent before the connection drops; status: the HTTP status.
    value: int = 0


@dataclass
class HfRepo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    #: Files stored in LFS (their ETag is their sha256); others get a git blob id.
    lfs: frozenset[str] = frozenset()
    #: Per-file ETag overrides, to make the Hub lie about a digest.
    etags: dict[str, str] = field(default_factory=dict)

    def etag(self, path: str) -> str:
        if path in self.etags:
            return self.etags[path]
        data = self.files[path]
        return sha256(data) if path in self.lfs else git_blob_id(data)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]


class LocalServer:
    """Serves ``files`` (path -> bytes) and ``hf`` repos; records every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.hf: dict[str, HfRepo] = {}
        self.faults: dict[str, deque[Fault]] = defaultdict(deque)
        self.requests: list[Request] = []
        self._httpd: ThreadingHTTPServer | None = None

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[LocalServer]:
        server = cls()
        handler = type("Handler", (_Handler,), {"app": server})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        server._httpd = httpd
        thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        thread.start()
        try:
            yield server
        finally:
            httpd.shutdown()
            httpd.server_close()
            thread.join()

    @property
    def base(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, data: bytes, **headers: str) -> str:
        self.files[path] = data
        self.headers[path] = {k.replace("_", "-"): v for k, v in headers.items()}
        return self.url(path)

    def gets(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "GET" and r.path == path]


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/?]+))?")


class _Handler(BaseHTTPRequestHandler):
    app: LocalServer

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_GET(self) -> None:
        self._answer(head=False)

    def _answer(self, *, head: bool) -> None:
        path = self.path.split("?")[0]
        self.app.requests.append(Request(self.command, path, dict(self.headers.items())))
        if (match := _API.match(path)) is not None:
            fault = self.app.faults[path].popleft() if self.app.faults[path] else None
            if fault is not None and fault.kind == "status":
                return self._status(fault.value)
            return self._api(match["repo"], match["rev"] or "main")
        if (match := _RESOLVE.match(path)) is not None:
            return self._resolve(match["repo"], match["rev"], match["path"], head)
        if path not in self.app.files:
            return self._status(404)
        self._file(path, self.app.files[path], self.app.headers.get(path, {}), head)

    def _status(self, status: int, **headers: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key.replace("_", "-"), value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _api(self, repo_id: str, rev: str) -> None:
        repo = self.app.hf.get(repo_id)
        if repo is None:
            return self._status(404, X_Error_Code="RepoNotFound")
        if rev not in ("main", repo.commit):
            return self._status(404, X_Error_Code="RevisionNotFound")
        siblings = []
        for name, data in sorted(repo.files.items()):
            sibling: dict[str, object] = {"rfilename": name, "size": len(data)}
            if name in repo.lfs:
                sibling["lfs"] = {"size": len(data), "sha256": repo.etag(name), "pointerSize": 130}
            else:
                sibling["blobId"] = repo.etag(name)
            siblings.append(sibling)
        body = json.dumps({
            "id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
            "siblings": siblings,
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _resolve(self, repo_id: str, rev: str, name: str, head: bool) -> None:
        repo = self.app.hf.get(repo_id)
        if repo is None:
            return self._status(404, X_Error_Code="RepoNotFound")
        if rev not in ("main", repo.commit):
            return self._status(404, X_Error_Code="RevisionNotFound")
        if name not in repo.files:
            return self._status(404, X_Error_Code="EntryNotFound", X_Repo_Commit=repo.commit)
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"'}
        if name in repo.lfs:
            headers["X-Linked-Etag"] = f'"{repo.etag(name)}"'
            headers["X-Linked-Size"] = str(len(repo.files[name]))
        self._file(f"/{repo_id}/resolve/{rev}/{name}", repo.files[name], headers, head)

    def _file(self, path: str, data: bytes, headers: dict[str, str], head: bool) -> None:
        fault = self.app.faults[path].popleft() if not head and self.app.faults[path] else None
        if fault is not None and fault.kind == "status":
            return self._status(fault.value)
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and (fault is None or fault.kind != "ignore-range"):
            start = int(wanted.removeprefix("bytes=").split("-")[0] or 0)
        if start >= len(data) and start:
            return self._status(416, Content_Range=f"bytes */{len(data)}")
        body = data[start:]
        self.send_response(206 if start else 200)
        headers = {"ETag": f'"{sha256(data)[:16]}"', **headers}
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if fault is not None and fault.kind == "truncate":
            self.wfile.write(body[: fault.value])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)
