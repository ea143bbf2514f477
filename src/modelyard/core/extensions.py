"""``ApiExtension``: HTTP routes a plugin adds under its own prefix, behind our auth and RBAC."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ROUTE_PERMISSIONS", "ApiExtension"]

#: What a plugin route may require; a route the extension names no permission for needs
#: ``admin``. Plugin routes are never public.
ROUTE_PERMISSIONS = frozenset({"read", "inspect", "infer", "operate", "admin"})
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
_KEY = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) /\S*$")


@dataclass(frozen=True)
class ApiExtension:
    """Routes served at ``/ext/{name}/...``; the HTTP layer mounts ``handlers`` there.

    ``handlers`` are the web framework's route handlers (Litestar ``@get``/``@post``
    functions or Controllers, with paths relative to the prefix). ``permissions`` maps
    ``"METHOD /relative/path/{param}"`` to one of ``ROUTE_PERMISSIONS``; every other route of
    the extension needs ``admin``. With ``model_scoped``, a route's ``{name}`` path parameter
    is a model name, checked against the caller's model scopes like our own routes.
    """

    name: str
    handlers: Sequence[Any]
    permissions: Mapping[str, str] = field(default_factory=dict)
    model_scoped: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"extension name {self.name!r}: lowercase letters, digits and -")
        if not self.handlers:
            raise ValueError(f"extension {self.name!r} has no route handlers")
        for key, permission in self.permissions.items():
            if not _KEY.match(key):
                raise ValueError(f"extension {self.name!r}: {key!r} is not 'METHOD /path'")
            if permission not in ROUTE_PERMISSIONS:
                known = ", ".join(sorted(ROUTE_PERMISSIONS))
                raise ValueError(
                    f"extension {self.name!r}: permission {permission!r} (use one of {known})"
                )

    @property
    def prefix(self) -> str:
        return f"/ext/{self.name}"
