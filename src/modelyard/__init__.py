"""modelyard: a pluggable inference server.

The public API is what ``__all__`` lists; everything else may change without notice.
``create_app`` (the HTTP app) is imported on first use, so plugins that import
``modelyard`` do not pay for the web framework.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelyard._version import __version__
from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.backend import Backend, BackendInfo, HealthReport, LoadContext, NoOptions
from modelyard.core.breaker import BreakerSettings, CircuitBreaker, CircuitState
from modelyard.core.cache_tier import CacheTier
from modelyard.core.context import ServerContext
from modelyard.core.errors import (
    BackendError,
    BadRequestError,
    ConfigError,
    ModelLoadError,
    ModelNotFoundError,
    ModelNotReadyError,
    ModelyardError,
    UnauthorizedError,
)
from modelyard.core.extensions import ApiExtension
from modelyard.core.hookspecs import hookimpl
from modelyard.core.pipeline import Answer, StreamAnswer
from modelyard.core.plugins import PluginHost, PluginRecord, PluginUnavailable
from modelyard.core.registry import VersionState
from modelyard.core.response_cache import CacheDirective, CacheStatus, ResponseCache
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, decode_settings, load_settings
from modelyard.core.sources import Progress, SourceScheme
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
from modelyard.core.views import ModelView, VersionView

if TYPE_CHECKING:
    from modelyard.api.app import create_app

__all__ = [
    "Answer",
    "ApiExtension",
    "AuthProvider",
    "Backend",
    "BackendError",
    "BackendInfo",
    "BadRequestError",
    "BreakerSettings",
    "CacheDirective",
    "CacheStatus",
    "CacheTier",
    "ChatMessage",
    "ChatRequest",
    "ClassificationRequest",
    "CircuitBreaker",
    "CircuitState",
    "ClassificationResult",
    "CompletionRequest",
    "ConfigError",
    "Credentials",
    "EmbeddingRequest",
    "EmbeddingResult",
    "GenerationParams",
    "GenerationResult",
    "HealthReport",
    "InferenceRequest",
    "InferenceResult",
    "InferenceService",
    "Label",
    "LoadContext",
    "ModelLoadError",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "ModelView",
    "ModelyardError",
    "NoOptions",
    "PluginHost",
    "PluginRecord",
    "PluginUnavailable",
    "Principal",
    "Progress",
    "ResponseCache",
    "ServerContext",
    "Settings",
    "SourceScheme",
    "StreamAnswer",
    "StreamChunk",
    "Task",
    "Tensor",
    "TensorRequest",
    "TensorResult",
    "TensorSpec",
    "UnauthorizedError",
    "VersionState",
    "VersionView",
    "__version__",
    "create_app",
    "decode_settings",
    "hookimpl",
    "load_settings",
]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from modelyard.api.app import create_app

        return create_app
    raise AttributeError(f"module 'modelyard' has no attribute {name!r}")
