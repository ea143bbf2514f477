"""The ``[auth]`` config section: providers in order, rate limits, audit log, loopback rule."""

from __future__ import annotations

from typing import Any

from msgspec import Struct, field

from modelyard.core.ratelimit import RateLimit

__all__ = ["ANONYMOUS", "ROLES", "AuthProviderSettings", "AuthSettings"]

#: Every role a principal may hold; anything else a provider reports is ignored.
ROLES = ("admin", "operator", "user", "viewer")
#: The ``rate_limits`` entry for callers without a principal (auth off, or failed attempts).
ANONYMOUS = "anonymous"


class AuthProviderSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``[[auth.providers]]`` entry: a registered provider name and its options."""

    provider: str
    #: Validated against the provider's ``options_type``.
    options: dict[str, Any] = field(default_factory=dict)


def _all_roles() -> list[str]:
    return ["admin"]


class AuthSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[auth]``: no providers means auth is off, which is allowed on loopback only."""

    #: Asked in order; the first that recognises a credential decides.
    providers: list[AuthProviderSettings] = field(default_factory=list)
    #: Serve without auth on a non-loopback address anyway (a trusted network, a sidecar).
    allow_unauthenticated_non_loopback: bool = False
    #: The roles of every caller while auth is off.
    anonymous_roles: list[str] = field(default_factory=_all_roles)
    #: Token buckets by role (the most generous of a principal's roles applies) and
    #: ``anonymous`` (per client address); a key created with its own limit overrides.
    #: A role without an entry is not limited.
    rate_limits: dict[str, RateLimit] = field(default_factory=dict)
    #: JSON-lines audit file; None logs events to the ``modelyard.audit`` logger only.
    audit_log: str | None = None

    def __post_init__(self) -> None:
        known = {*ROLES, ANONYMOUS}
        for name in self.rate_limits:
            if name not in known:
                raise ValueError(
                    f"rate_limits: unknown role {name!r}; "
                    f"expected one of {', '.join(sorted(known))}"
                )
        for role in self.anonymous_roles:
            if role not in ROLES:
                raise ValueError(f"anonymous_roles: unknown role {role!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.providers)
