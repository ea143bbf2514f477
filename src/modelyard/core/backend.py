"""The ``Backend`` extension point: what a runtime plugin implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import msgspec

from modelyard.core.errors import UnsupportedTaskError
from modelyard.core.types import (
    InferenceRequest,
    InferenceResult,
    StreamChunk,
    Task,
    TensorSpec,
)

__all__ = ["Backend", "BackendInfo", "HealthReport", "LoadContext", "NoOptions"]


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options type of a backend that takes none."""


class LoadContext(msgspec.Struct, frozen=True):
    """Everything a backend is given about the version it serves."""

    model: str
    version: str
    task: Task | None
    source: str
    path: Path | None
    options: Any


class HealthReport(msgspec.Struct, frozen=True):
    healthy: bool
    detail: str = ""


class BackendInfo(msgspec.Struct, frozen=True):
    """What metadata endpoints show about a loaded version."""

    inputs: list[TensorSpec] = msgspec.field(default_factory=list)
    outputs: list[TensorSpec] = msgspec.field(default_factory=list)
    parameters: dict[str, Any] = msgspec.field(default_factory=dict)
    platform: str = ""


class Backend:
    """Base class of every backend; one instance serves one model version.

    Subclasses set ``name``, ``tasks`` and optionally ``options_type``, and override
    ``load``, ``infer`` and, for generation, ``stream``. The engine calls ``infer`` with a
    batch of requests of one task; results come back in the same order.
    """

    #: The name used in config (``backend = "onnx"``).
    name: ClassVar[str] = ""
    #: Tasks this backend can serve; a version's task must be among them.
    tasks: ClassVar[frozenset[Task]] = frozenset()
    #: The msgspec Struct that ``[models.options]`` is validated against.
    options_type: ClassVar[type[msgspec.Struct]] = NoOptions
    #: Largest batch ``infer`` accepts; the engine never sends more.
    max_batch_size: int = 1
    #: How many ``infer`` calls the engine may have in flight at once (1: one after another).
    concurrent_batches: int = 1

    def __init__(self, context: LoadContext) -> None:
        self.context = context
        self.options = context.options
        self.task: Task | None = context.task

    async def load(self) -> None:
        """Load weights and runtime state. Override; raise ``ModelLoadError`` on a bad model."""

    async def unload(self) -> None:
        """Release everything ``load`` acquired. Override when there is something to release."""

    async def infer(self, batch: Sequence[InferenceRequest]) -> list[InferenceResult]:
        """Serve a batch of same-task requests, results in order. Override."""
        raise UnsupportedTaskError(f"backend {self.name!r} does not implement infer")

    def stream(self, request: InferenceRequest) -> AsyncIterator[StreamChunk]:
        """Yield a generation piece by piece; the last chunk has ``finish_reason``. Override."""
        raise UnsupportedTaskError(f"backend {self.name!r} does not stream")

    async def health(self) -> HealthReport:
        """Report whether this version can serve. Override for a real probe."""
        return HealthReport(healthy=True)

    def info(self) -> BackendInfo:
        """Describe inputs, outputs and runtime parameters. Override to add detail."""
        return BackendInfo(platform=self.name)

    @classmethod
    def detect_task(cls, path: Path | None, options: Any) -> Task | None:
        """Guess the task from the model files when config names none. Override."""
        return None

    @property
    def supports_streaming(self) -> bool:
        return type(self).stream is not Backend.stream
