"""``modelyard.lock``: each configured model's resolved revision and digests.

``modelyard lock CONFIG`` writes it next to the config; ``modelyard serve --locked`` loads
only sources it lists, each pinned to the locked revision and checked against the locked
digest (a mismatch fails that version's load, naming both digests).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
from msgspec import Struct

from modelyard.core.errors import ConfigError, ModelLoadError
from modelyard.core.integrity import file_digest, listing_digest, split_pin, tree_files, with_pin
from modelyard.core.settings import Settings, cache_dir_of
from modelyard.core.sources import Progress, SourceResolver, SourceScheme
from modelyard.plugins.store import hf, wheels
from modelyard.plugins.store.pull import STORE_SCHEMES, canonical
from modelyard.plugins.store.store import Manifest, ModelStore, StoredFile

if TYPE_CHECKING:
    from modelyard.core.loader import ResolveSource

__all__ = [
    "LOCK_NAME",
    "LockFile",
    "LockedModel",
    "LockedResolver",
    "lock_models",
    "read_lock",
    "serve_resolver",
    "write_lock",
]

LOCK_NAME = "modelyard.lock"


class LockedModel(Struct, frozen=True, kw_only=True):
    name: str
    version: str
    #: The configured source, without a pin.
    source: str
    #: A source naming exactly this content (a Hub commit, a wheel version, a pinned URL).
    resolved: str
    revision: str = ""
    #: sha256 of the file, or the folder's listing digest.
    digest: str
    files: list[StoredFile]


class LockFile(Struct, kw_only=True):
    lock_version: int = 1
    models: list[LockedModel] = msgspec.field(default_factory=list)

    def find(self, source: str) -> LockedModel | None:
        return next((m for m in self.models if m.source == source), None)


def _store_backed(source: str) -> bool:
    return source.partition(":")[0] in STORE_SCHEMES


def _resolved(source: str, manifest: Manifest) -> str:
    """A source that names the locked content itself, not whatever upstream holds later."""
    scheme = source.partition(":")[0]
    if scheme == "hf" and manifest.revision:
        repo = hf.parse_reference(source.removeprefix("hf:"), source)
        return f"hf:{repo.repo}@{manifest.revision}" + (f"/{repo.path}" if repo.path else "")
    if scheme == "pypi" and "==" in manifest.revision:
        wheel = wheels.parse_reference(source.removeprefix("pypi:"), source)
        version = manifest.revision.split("==", 1)[1]
        return f"pypi:{wheel.package}=={version}" + (f"/{wheel.path}" if wheel.path else "")
    if scheme in ("https", "http"):
        return f"{source}#sha256={manifest.digest}"
    return source


def _describe(path: Path) -> tuple[str, list[StoredFile]]:
    if path.is_file():
        digest = file_digest(path)
        return digest, [StoredFile(path=path.name, size=path.stat().st_size, sha256=digest)]
    files = [
        StoredFile(path=rel, size=p.stat().st_size, sha256=file_digest(p))
        for rel, p in tree_files(path)
    ]
    return listing_digest((f.path, f.sha256) for f in files), files


def lock_models(
    settings: Settings, schemes: Mapping[str, type[SourceScheme]], progress: Progress
) -> LockFile:
    """Resolve every configured model (pulling what the store lacks) and record its content."""
    resolve = SourceResolver(schemes)
    cache_dir = cache_dir_of(settings)
    store = ModelStore.under(cache_dir)
    models = []
    for i, model in enumerate(settings.models):
        source = with_pin(model.source, model.sha256, f"$.models[{i}].sha256")
        path = resolve(source, cache_dir, progress)
        base, _ = split_pin(source)
        manifest = store.find(canonical(base)) if _store_backed(base) else None
        if manifest is not None and store.path_of(manifest) == path:
            digest, files = manifest.digest, manifest.files
            revision, resolved = manifest.revision, _resolved(base, manifest)
        else:
            (digest, files), revision, resolved = _describe(path), "", base
        models.append(LockedModel(
            name=model.name, version=model.version, source=base, resolved=resolved,
            revision=revision, digest=digest, files=files,
        ))
    return LockFile(models=models)


def write_lock(lock: LockFile, path: Path) -> None:
    data = msgspec.json.format(msgspec.json.encode(lock), indent=2) + b"\n"
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def read_lock(path: Path) -> LockFile:
    try:
        return msgspec.json.decode(path.read_bytes(), type=LockFile)
    except OSError:
        raise ConfigError(f"{path}: no lockfile; write one with: modelyard lock CONFIG") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not a valid lockfile ({exc})") from None


class LockedResolver:
    """Resolves only sources the lock lists, to the locked content, checked by digest."""

    def __init__(self, lock: LockFile, inner: ResolveSource) -> None:
        self._lock = lock
        self._inner = inner

    def __call__(self, source: str, cache_dir: Path, progress: Progress) -> Path:
        base, pin = split_pin(source)
        entry = self._lock.find(base)
        if entry is None:
            raise ModelLoadError(
                f"model source {base!r} is not in {LOCK_NAME}; serve --locked loads only "
                "locked models (run: modelyard lock CONFIG)"
            )
        if pin is not None and (pin.algorithm != "sha256" or pin.hex != entry.digest):
            raise ModelLoadError(
                f"model source {source!r}: its pin {pin} disagrees with {LOCK_NAME} "
                f"(sha256:{entry.digest}); run: modelyard lock CONFIG"
            )
        target = base
        if _store_backed(base):
            held = ModelStore.under(cache_dir).find(canonical(base))
            if held is None or held.digest != entry.digest:
                target = entry.resolved  # pull the locked revision, not upstream's latest
        return self._inner(with_pin(split_pin(target)[0], entry.digest), cache_dir, progress)


def serve_resolver(
    config: str | None, settings: Settings, schemes: Mapping[str, type[SourceScheme]], *,
    locked: bool, offline: bool,
) -> ResolveSource | None:
    """The source resolver ``modelyard serve`` hands the service (None: the default one).

    ``offline`` sets ``HF_HUB_OFFLINE=1``, which every store-backed scheme and the Hub
    client obey; ``locked`` reads the lockfile beside ``config`` and refuses a configured
    model it does not list.
    """
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not locked:
        return None
    if config is None:
        raise ConfigError(f"--locked needs --config: {LOCK_NAME} sits beside the config file")
    lock_path = Path(config).parent / LOCK_NAME
    lock = read_lock(lock_path)
    missing = [
        f"{m.name}:{m.version} ({split_pin(m.source)[0]})"
        for m in settings.models if lock.find(split_pin(m.source)[0]) is None
    ]
    if missing:
        raise ConfigError(
            f"{lock_path} does not list {', '.join(missing)}; run: modelyard lock {config}"
        )
    return LockedResolver(lock, SourceResolver(schemes))
