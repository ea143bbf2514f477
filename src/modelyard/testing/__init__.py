"""Fakes and helpers that modelyard's own tests and third-party plugin authors reuse."""

from __future__ import annotations

from modelyard.testing.backends import (
    CountingBackend,
    EchoBackend,
    EchoOptions,
    FailingBackend,
    HangingBackend,
    SlowBackend,
)
from modelyard.testing.clock import FakeClock
from modelyard.testing.server import LiveServer, run_live_server

__all__ = [
    "CountingBackend",
    "EchoBackend",
    "EchoOptions",
    "FailingBackend",
    "FakeClock",
    "HangingBackend",
    "LiveServer",
    "SlowBackend",
    "run_live_server",
]
