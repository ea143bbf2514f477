"""``ServerContext``: the narrow, read-only view of the server that lifecycle hooks receive."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from modelyard.core.plugins import PluginRecord
from modelyard.core.settings import Settings
from modelyard.core.views import ModelView

__all__ = ["ServerContext"]


class ServerContext:
    """What a plugin may read about the running server; nothing here changes it."""

    __slots__ = ("_models", "_plugins", "_settings", "cache_dir", "version")

    def __init__(
        self,
        settings: Settings,
        *,
        version: str,
        cache_dir: Path,
        models: Callable[[], list[ModelView]],
        plugins: Callable[[], list[PluginRecord]],
    ) -> None:
        self._settings = settings
        #: The modelyard version serving.
        self.version = version
        #: Where sources are prepared and the response cache keeps its files.
        self.cache_dir = cache_dir
        self._models = models
        self._plugins = plugins

    @property
    def settings(self) -> Settings:
        """The server's configuration (treat it as read-only)."""
        return self._settings

    def models(self) -> list[ModelView]:
        """Every model with its versions and states, as of now."""
        return self._models()

    def plugins(self) -> list[PluginRecord]:
        """Every plugin found: loaded, skipped or failed."""
        return self._plugins()
