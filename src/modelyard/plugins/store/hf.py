"""``hf:ORG/REPO[@REVISION][/PATH]`` through ``huggingface_hub``, then into the store.

The Hub's own client does the transfer, so its cache (``HF_HOME``/``HF_HUB_CACHE``), resumed
downloads, ``HF_ENDPOINT`` and tokens (``HF_TOKEN``, ``huggingface-cli login``) all apply.
Each file is then checked against the Hub's digest (an LFS file's sha256, a small file's git
blob id) and hard-linked, or copied, into the store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from modelyard.core.errors import ModelLoadError
from modelyard.plugins.store.store import (
    ByteProgress,
    Manifest,
    ModelStore,
    Pulled,
    StoredFile,
    disk_full,
)

__all__ = ["HfReference", "parse_reference", "pull"]

log = logging.getLogger(__name__)

_REPO_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class HfReference:
    repo: str
    revision: str | None
    path: str


def parse_reference(reference: str, source: str) -> HfReference:
    """``ORG/REPO[@REVISION][/PATH]`` -> its parts, or ``ModelLoadError`` naming the source."""
    parts = reference.split("/")
    if len(parts) < 2:
        raise ModelLoadError(f"model source {source!r}: expected hf:ORG/REPO[@REVISION][/PATH]")
    org, repo_part, rest = parts[0], parts[1], parts[2:]
    repo, _, revision = repo_part.partition("@")
    if not (_REPO_PART.match(org) and _REPO_PART.match(repo)) or any(p in ("", "..") for p in rest):
        raise ModelLoadError(f"model source {source!r}: expected hf:ORG/REPO[@REVISION][/PATH]")
    return HfReference(f"{org}/{repo}", revision or None, "/".join(rest))


def _hub() -> ModuleType:
    try:
        import huggingface_hub
        import huggingface_hub.constants
        import huggingface_hub.errors
        import huggingface_hub.utils
    except ImportError:
        raise ModelLoadError(
            "hf: sources need huggingface_hub (pip install huggingface_hub)"
        ) from None
    utils: Any = huggingface_hub.utils
    utils.disable_progress_bars()  # the caller draws the one progress bar
    return huggingface_hub


def pull(
    ref: HfReference, *, source: str, store: ModelStore, current: Manifest | None,
    progress: ByteProgress, offline: bool,
) -> Pulled | None:
    """Bring ``ref`` into the store's blobs; None when ``current`` already holds that commit."""
    hub = _hub()
    try:
        if offline:
            return _from_cache(hub, ref, source, store, progress)
        return _from_hub(hub, ref, source, store, current, progress)
    except ModelLoadError:
        raise
    except Exception as exc:
        log.debug("pulling %s failed", source, exc_info=True)
        raise _explain(hub, exc, ref, source, offline) from None


def _from_hub(
    hub: ModuleType, ref: HfReference, source: str, store: ModelStore,
    current: Manifest | None, progress: ByteProgress,
) -> Pulled | None:
    endpoint = os.environ.get("HF_ENDPOINT") or None
    revision = ref.revision or "main"
    if ref.path:
        url = hub.hf_hub_url(ref.repo, ref.path, revision=revision, endpoint=endpoint)
        try:
            meta = hub.get_hf_file_metadata(url, endpoint=endpoint)
        except hub.errors.EntryNotFoundError:
            meta = None  # perhaps a folder: the listing below tells
        if meta is not None:
            commit = str(meta.commit_hash or revision)
            if current is not None and current.revision == commit:
                return None
            name = ref.path.rsplit("/", 1)[-1]
            stored = _download(hub, ref, ref.path, commit, name, meta.etag, meta.size, store,
                               progress, endpoint, source)
            return Pulled([stored], commit, name)
    info = hub.HfApi(endpoint=endpoint).model_info(
        ref.repo, revision=revision, files_metadata=True
    )
    commit = str(info.sha)
    if current is not None and current.revision == commit:
        return None
    prefix = f"{ref.path}/" if ref.path else ""
    siblings = [s for s in info.siblings or [] if s.rfilename.startswith(prefix)]
    if not siblings:
        raise ModelLoadError(
            f"model source {source!r}: {ref.repo}@{revision} has no file or folder {ref.path!r}"
        )
    files = []
    for sibling in siblings:
        expected = sibling.lfs.sha256 if sibling.lfs is not None else sibling.blob_id
        files.append(_download(
            hub, ref, sibling.rfilename, commit, sibling.rfilename[len(prefix):], expected,
            sibling.size, store, progress, endpoint, source,
        ))
    return Pulled(files, commit, "")


def _download(
    hub: ModuleType, ref: HfReference, filename: str, commit: str, relative: str,
    etag: str | None, size: int | None, store: ModelStore, progress: ByteProgress,
    endpoint: str | None, source: str,
) -> StoredFile:
    blobs = Path(hub.constants.HF_HUB_CACHE) / f"models--{ref.repo.replace('/', '--')}" / "blobs"
    with _watch(blobs, relative, size, progress):
        local = hub.hf_hub_download(ref.repo, filename, revision=commit, endpoint=endpoint)
    return _adopt(Path(local), relative, etag, store, progress, source)


def _from_cache(
    hub: ModuleType, ref: HfReference, source: str, store: ModelStore, progress: ByteProgress
) -> Pulled:
    """Offline: only what the Hugging Face cache already holds."""
    revision = ref.revision or "main"
    if ref.path:
        try:
            local = Path(hub.hf_hub_download(
                ref.repo, ref.path, revision=revision, local_files_only=True
            ))
        except hub.errors.LocalEntryNotFoundError:
            local = None  # perhaps a cached folder
        if local is not None:
            commit = local.parents[len(ref.path.split("/")) - 1].name
            name = local.name
            return Pulled([_adopt(local, name, _cached_etag(local), store, progress, source)],
                          commit, name)
    snapshot = Path(hub.snapshot_download(
        ref.repo, revision=revision, local_files_only=True,
        allow_patterns=[f"{ref.path}/*"] if ref.path else None,
    ))
    folder = snapshot / ref.path if ref.path else snapshot
    if not folder.is_dir():
        raise hub.errors.LocalEntryNotFoundError(ref.path)
    files = [
        _adopt(p, p.relative_to(folder).as_posix(), _cached_etag(p), store, progress, source)
        for p in sorted(folder.rglob("*")) if p.is_file()
    ]
    return Pulled(files, snapshot.name, "")


def _adopt(
    local: Path, relative: str, etag: str | None, store: ModelStore, progress: ByteProgress,
    source: str,
) -> StoredFile:
    stored = store.add_file(local, relative, label=relative, progress=progress, link=True)
    expected = (etag or "").strip('"').lower()
    actual = None
    if _HEX64.match(expected):
        actual = stored.sha256
    elif _HEX40.match(expected):
        actual = _git_blob_id(store.blob(stored.sha256), stored.size)
    if actual is not None and actual != expected:
        store.drop_unused([stored])
        raise ModelLoadError(
            f"model source {source!r}: {relative} does not match the Hub's digest: expected "
            f"{expected}, actual {actual}; the Hugging Face cache's copy may be damaged "
            "(huggingface-cli delete-cache), pull again"
        )
    return stored


def _cached_etag(path: Path) -> str | None:
    """A cache snapshot's file links to ``blobs/<etag>``: the Hub's digest of it."""
    try:
        return Path(os.readlink(path)).name if path.is_symlink() else None
    except OSError:
        return None


def _git_blob_id(path: Path, size: int) -> str:
    hasher = hashlib.sha1(f"blob {size}\0".encode(), usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()


@contextmanager
def _watch(
    blobs: Path, label: str, total: int | None, progress: ByteProgress
) -> Iterator[None]:
    """Report the Hub client's download progress from the size of its ``.incomplete`` file."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.25):
            try:
                sizes = [p.stat().st_size for p in blobs.glob("*.incomplete")]
            except OSError:
                continue
            if sizes:
                progress(label, max(sizes), total)

    watcher = threading.Thread(target=run, name="hf-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()
    if total is not None:
        progress(label, total, total)


def _explain(
    hub: ModuleType, exc: Exception, ref: HfReference, source: str, offline: bool
) -> ModelLoadError:
    """A sentence for the Hub client's exception, chosen by its class."""
    errors: Any = hub.errors
    where = f"{ref.repo}@{ref.revision or 'main'}"
    endpoint = os.environ.get("HF_ENDPOINT") or hub.constants.ENDPOINT
    if isinstance(exc, errors.GatedRepoError):
        problem = f"{ref.repo} is gated: accept its terms on the Hub and log in (HF_TOKEN)"
    elif isinstance(exc, errors.RepositoryNotFoundError):
        problem = (
            f"repository {ref.repo} not found at {endpoint} (a private one needs a token: "
            "HF_TOKEN or huggingface-cli login)"
        )
    elif isinstance(exc, errors.RevisionNotFoundError):
        problem = f"revision {ref.revision or 'main'!r} not found in {ref.repo}"
    elif isinstance(exc, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        problem = (
            f"{where} is not in the Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)"
            if offline else f"cannot reach {endpoint}, and {where} is not in its cache"
        )
    elif isinstance(exc, errors.EntryNotFoundError):
        problem = f"{where} has no file {ref.path!r}"
    elif isinstance(exc, errors.HfHubHTTPError):
        status = getattr(exc.response, "status_code", "?")
        problem = f"the Hub answered HTTP {status}"
    elif _is_network_error(exc):
        problem = f"cannot reach {endpoint} (network error); pull again to resume"
    elif isinstance(exc, OSError):
        problem = (
            "the disk holding the caches is full" if disk_full(exc)
            else "the download failed or was cut short; pull again to resume"
        )
    else:
        problem = f"unexpected error from huggingface_hub ({type(exc).__name__})"
    return ModelLoadError(f"model source {source!r}: {problem}")


def _is_network_error(exc: Exception) -> bool:
    try:
        import requests  # huggingface_hub's transport
    except ImportError:
        return False
    return isinstance(exc, requests.ConnectionError | requests.Timeout)
