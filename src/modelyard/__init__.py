"""modelyard: a pluggable inference server.

The public API is what ``__all__`` lists; everything else may change without notice.
"""

from __future__ import annotations

__version__ = "0.1.0"

from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.backend import Backend, BackendInfo, HealthReport, LoadContext, NoOptions
from modelyard.core.cache_tier import CacheTier
from modelyard.core.errors import (
    BackendError,
    BadRequestError,
    ModelLoadError,
    ModelyardError,
)
from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginUnavailable
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Label,
    StreamChunk,
    Task,
    Tensor,
    TensorRequest,
    TensorResult,
    TensorSpec,
)

__all__ = [
    "AuthProvider",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BadRequestError",
    "CacheTier",
    "ChatMessage",
    "ChatRequest",
    "ClassificationRequest",
    "ClassificationResult",
    "CompletionRequest",
    "Credentials",
    "EmbeddingRequest",
    "EmbeddingResult",
    "GenerationParams",
    "GenerationResult",
    "HealthReport",
    "InferenceRequest",
    "InferenceResult",
    "Label",
    "LoadContext",
    "ModelLoadError",
    "ModelyardError",
    "NoOptions",
    "PluginUnavailable",
    "Principal",
    "StreamChunk",
    "Task",
    "Tensor",
    "TensorRequest",
    "TensorResult",
    "TensorSpec",
    "__version__",
    "hookimpl",
]
