"""Plugin core, configuration, registry, engine and the one inference service; no HTTP here."""

from modelyard.core.plugins import PluginHost, PluginRecord
from modelyard.core.registry import ModelVersion, VersionState
from modelyard.core.service import InferenceService
from modelyard.core.settings import ModelSpec, Settings, decode_settings, load_settings

__all__ = [
    "InferenceService",
    "ModelSpec",
    "ModelVersion",
    "PluginHost",
    "PluginRecord",
    "Settings",
    "VersionState",
    "decode_settings",
    "load_settings",
]
