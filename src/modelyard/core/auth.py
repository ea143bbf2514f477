"""The ``AuthProvider`` extension point: turns a credential into a principal."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, ClassVar

import msgspec

from modelyard.core.backend import NoOptions

__all__ = ["AuthProvider", "Credentials", "Principal"]


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: an id, roles, and the models they may use (None = all)."""

    id: str
    roles: frozenset[str] = frozenset()
    model_scopes: frozenset[str] | None = None
    tenant: str = ""

    def may_use(self, model: str) -> bool:
        """Whether the model scopes (names or ``fnmatch`` patterns) cover ``model``."""
        scopes = self.model_scopes
        return scopes is None or any(fnmatchcase(model, pattern) for pattern in scopes)


class Credentials(msgspec.Struct, frozen=True):
    """What a request presented: the Authorization header split into scheme and token."""

    scheme: str
    token: str
    client_address: str = ""


class AuthProvider:
    """Base class of an auth provider; providers are asked in order, the first answer wins.

    Subclasses set ``name`` and ``options_type`` and override ``authenticate``.
    """

    name: ClassVar[str] = ""
    options_type: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        """Return the principal, None if the credential is not this provider's kind. Override.

        Raise ``UnauthorizedError`` when the credential is this provider's but is invalid.
        """
        raise NotImplementedError
