"""The first-party auth providers as a plugin (entry point ``auth`` in the ``modelyard`` group)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from modelyard.core.auth import AuthProvider
from modelyard.core.hookspecs import hookimpl
from modelyard.plugins.apikeys import ApiKeyProvider

__all__ = ["register_auth_providers"]


@hookimpl
def register_auth_providers(register: Callable[[type[AuthProvider]], None]) -> None:
    register(ApiKeyProvider)
    # Without PyJWT (an environment installed before it became a dependency) the API keys
    # still work; the jwt provider is simply not offered.
    if importlib.util.find_spec("jwt") is not None:
        from modelyard.plugins.jwt import JwtProvider

        register(JwtProvider)
