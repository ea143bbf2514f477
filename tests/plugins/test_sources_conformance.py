"""The ``pypi:`` and ``demo:`` schemes pass the conformance kit plugin authors run."""

from __future__ import annotations

import pytest

from modelyard.plugins.sources import DemoSource, PypiSource
from modelyard.testing import SourceSchemeConformance


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown package must be refused here, never looked up on an index."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class TestPypiSourceConformance(SourceSchemeConformance):
    scheme = PypiSource
    entry_point = "sources"
    known_references = ("modelyard/py.typed",)
    unknown_references = ("no-such-package-for-modelyard", "modelyard/no/such/model.onnx")


class TestDemoSourceConformance(SourceSchemeConformance):
    """Offline only the refusal can be checked: preparing a demo downloads and exports."""

    scheme = DemoSource
    entry_point = "sources"
    unknown_references = ("no-such-demo-model",)
