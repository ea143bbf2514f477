"""The model store: ``modelyard pull``, content-addressed blobs, manifests and the lockfile."""

from __future__ import annotations

from modelyard.plugins.store.pull import PullResult, canonical, offline_mode, pull
from modelyard.plugins.store.store import Manifest, ModelStore, StoredFile

__all__ = [
    "Manifest",
    "ModelStore",
    "PullResult",
    "StoredFile",
    "canonical",
    "offline_mode",
    "pull",
]
