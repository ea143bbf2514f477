"""The store-backed schemes pass the conformance kit plugin authors run (offline)."""

from __future__ import annotations

import pytest

from modelyard.plugins.store.schemes import HfSource, HttpsSource, StoreSource
from modelyard.testing import SourceSchemeConformance


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unknown references must fail here without reaching any network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class TestHfSourceConformance(SourceSchemeConformance):
    scheme = HfSource
    entry_point = "store"
    unknown_references = ("nobody-here/no-such-repo/model.gguf",)


class TestHttpsSourceConformance(SourceSchemeConformance):
    scheme = HttpsSource
    entry_point = "store"
    unknown_references = ("//models.invalid/no-such.gguf#sha256=" + "0" * 64,)


class TestStoreSourceConformance(SourceSchemeConformance):
    scheme = StoreSource
    entry_point = "store"
    unknown_references = ("no-such-pulled-model",)
