"""The store-backed source schemes ``hf:``, ``https:``, ``http:`` and ``store:``.

A configured source resolves from the model store, pulled there on first use (never in
offline mode, ``HF_HUB_OFFLINE``). A ``#sha256=HEX`` pin is checked by re-hashing the stored
files before the backend sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modelyard.core.errors import ModelLoadError
from modelyard.core.hookspecs import hookimpl
from modelyard.core.integrity import split_pin
from modelyard.core.sources import Progress, SourceScheme
from modelyard.plugins.store.pull import resolve_in_store
from modelyard.plugins.store.store import ModelStore

__all__ = ["HfSource", "HttpSource", "HttpsSource", "StoreSource"]


class _PulledSource(SourceScheme):
    """A source pulled into the store on first use (unless offline), then served from it."""

    verifies_pins = True

    def resolve(self, reference: str, *, cache_dir: Path, progress: Progress) -> Path:
        return resolve_in_store(f"{self.name}:{reference}", cache_dir, progress)


class HfSource(_PulledSource):
    """``hf:ORG/REPO[@REVISION][/PATH]``: a Hugging Face Hub file or folder."""

    name = "hf"


class HttpsSource(_PulledSource):
    """``https://HOST/PATH#sha256=HEX``: a pinned URL (the pin may come from the server)."""

    name = "https"


class HttpSource(_PulledSource):
    """``http://127.0.0.1/...``: plain http, for loopback hosts only."""

    name = "http"


class StoreSource(SourceScheme):
    """``store:NAME``: a model pulled before under that name; never touches the network."""

    name = "store"
    verifies_pins = True

    def resolve(self, reference: str, *, cache_dir: Path, progress: Progress) -> Path:
        name, pin = split_pin(reference)
        store = ModelStore.under(cache_dir)
        manifest = store.manifest(name)
        if manifest is None:
            raise ModelLoadError(
                f"model source 'store:{reference}': no model named {name!r} in the store "
                "(modelyard models ls lists them)"
            )
        return store.check(manifest, pin, f"store:{reference}")


@hookimpl
def register_source_schemes(register: Callable[[type[SourceScheme]], None]) -> None:
    register(HfSource)
    register(HttpsSource)
    register(HttpSource)
    register(StoreSource)
