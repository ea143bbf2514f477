"""Durable batch jobs: the OpenAI Files and Batch API's state, files and runner (no HTTP)."""

from modelyard.core.jobs.batches import BatchJobs, ModelCatalog, Page, known_model
from modelyard.core.jobs.model import (
    ENDPOINTS,
    Batch,
    BatchStatus,
    FileObject,
    InputLine,
    LineExecutor,
    LineResult,
)
from modelyard.core.jobs.runner import ProgressListener
from modelyard.core.jobs.settings import BatchSettings

__all__ = [
    "ENDPOINTS",
    "Batch",
    "BatchJobs",
    "BatchSettings",
    "BatchStatus",
    "FileObject",
    "InputLine",
    "LineExecutor",
    "LineResult",
    "ModelCatalog",
    "Page",
    "ProgressListener",
    "known_model",
]
