"""Fakes and helpers that modelyard's own tests and third-party plugin authors reuse.

The conformance kit (``BackendConformance`` and friends) loads on first use: it needs pytest,
which a server that only serves the fakes does not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from modelyard.testing.backends import (
    CountingBackend,
    EchoBackend,
    EchoOptions,
    FailingBackend,
    HangingBackend,
    SlowBackend,
    StuckBackend,
)
from modelyard.testing.clock import FakeClock
from modelyard.testing.server import LiveServer, run_live_server
from modelyard.testing.soak import (
    LoadReport,
    ProcessSample,
    metric_value,
    process_sampling_available,
    run_load,
    sample_process,
)
from modelyard.testing.waiting import wait_until

if TYPE_CHECKING:
    from modelyard.testing.conformance import (
        AuthProviderConformance,
        BackendConformance,
        CacheTierConformance,
        ConformanceError,
        SourceSchemeConformance,
    )

__all__ = [
    "AuthProviderConformance",
    "BackendConformance",
    "CacheTierConformance",
    "ConformanceError",
    "CountingBackend",
    "EchoBackend",
    "EchoOptions",
    "FailingBackend",
    "FakeClock",
    "HangingBackend",
    "LiveServer",
    "LoadReport",
    "ProcessSample",
    "SlowBackend",
    "StuckBackend",
    "SourceSchemeConformance",
    "metric_value",
    "process_sampling_available",
    "run_live_server",
    "run_load",
    "sample_process",
    "wait_until",
]

_CONFORMANCE = frozenset(
    {
        "AuthProviderConformance",
        "BackendConformance",
        "CacheTierConformance",
        "ConformanceError",
        "SourceSchemeConformance",
    }
)


def __getattr__(name: str) -> Any:
    if name in _CONFORMANCE:
        return getattr(importlib.import_module("modelyard.testing.conformance"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
