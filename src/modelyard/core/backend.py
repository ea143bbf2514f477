"""The ``Backend`` extension point: what a runtime plugin implements."""

from __future__ import annotations

import contextlib
import os
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

__all__ = ["Backend", "BackendInfo", "HealthReport", "LoadContext", "NoOptions", "files_size"]


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

    def memory_bytes(self) -> int:
        """Bytes this loaded version holds, for the server's memory budget. Override to add
        what the runtime allocates beyond its files (a KV cache, an arena).

        Called once after ``load`` (in a worker thread). The default is the size of the
        files at ``context.path`` (every file under it, for a folder): a floor, since a
        runtime holds at least its weights.
        """
        return files_size(self.context.path)

    @classmethod
    def detect_task(cls, path: Path | None, options: Any) -> Task | None:
        """Guess the task from the model files when config names none. Override."""
        return None

    @property
    def supports_streaming(self) -> bool:
        return type(self).stream is not Backend.stream


#: Files ``files_size`` looks at under a folder: a model folder holds a handful, and a source
#: that is not one (``.`` for a fake backend) must not cost a walk of a whole tree.
FILES_SIZE_LIMIT = 1000


def files_size(path: Path | None, *, limit: int = FILES_SIZE_LIMIT) -> int:
    """Bytes of the file at ``path``, or of the files under it (the first ``limit`` found,
    so still a floor); 0 when there is none."""
    if path is None:
        return 0
    try:
        if path.is_file():
            return path.stat().st_size
        total = 0
        for root, _, names in os.walk(path):
            for name in names:
                with contextlib.suppress(OSError):
                    total += (Path(root) / name).stat().st_size
                limit -= 1
                if limit <= 0:
                    return total
        return total
    except OSError:
        return 0
