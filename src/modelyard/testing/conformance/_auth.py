"""``AuthProviderConformance``: accept, deny, not mine; secrets compared in constant time."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.auth_settings import ROLES
from modelyard.core.errors import UnauthorizedError
from modelyard.testing.conformance._common import (
    ConformanceError,
    check_options_type,
    host_for_entry_point,
    provided_by,
    run_async,
)

__all__ = ["AuthProviderConformance", "find_plain_secret_comparisons"]

#: Identifier parts that name a secret; ``==`` on them leaks timing.
_SECRET_WORDS = frozenset(
    {"secret", "digest", "password", "passwd", "signature", "hmac", "mac", "token", "apikey"}
)


class AuthProviderConformance:
    """The auth-provider contract as pytest tests: subclass it as ``Test...`` and configure it.

    Override ``valid_credentials`` and ``invalid_credentials`` (credentials of the provider's
    kind that it must refuse); ``foreign_credentials`` has defaults no provider should claim.
    The constant-time check is static: it reads the source of ``secret_comparison_modules``
    (default: the provider's module) for ``hmac.compare_digest`` / ``secrets.compare_digest``
    and flags ``==`` / ``!=`` on names that look like secrets in the provider's module.
    """

    #: The AuthProvider subclass under test.
    provider: ClassVar[type[AuthProvider] | None] = None
    #: The entry point in the ``modelyard`` group that registers it; None skips the check.
    entry_point: ClassVar[str | None] = None
    options: ClassVar[Mapping[str, Any]] = {}
    #: Whether checking a credential compares a secret (a key, an HMAC, a signature).
    compares_secrets: ClassVar[bool] = True
    #: Modules that compare the secrets (a library's, when it verifies signatures); empty:
    #: the provider's own module.
    secret_comparison_modules: ClassVar[Sequence[str]] = ()
    timeout_s: ClassVar[float] = 30.0

    # -- what an author provides ----------------------------------------------------------

    def provider_class(self) -> type[AuthProvider]:
        if self.provider is None:
            raise ConformanceError("set provider (the AuthProvider subclass)")
        return self.provider

    def make_provider(self, tmp_path: Path) -> AuthProvider:
        """A provider built from ``options``; override to give it files or a clock."""
        cls = self.provider_class()
        options = check_options_type(f"auth provider {cls.name!r}", cls.options_type, self.options)
        return cls(options)

    def valid_credentials(self, provider: AuthProvider) -> Credentials:
        """A credential ``provider`` accepts. Override."""
        raise ConformanceError("override valid_credentials(provider): a credential it accepts")

    def invalid_credentials(self, provider: AuthProvider) -> Sequence[Credentials]:
        """Credentials of the provider's kind that it must refuse. Override."""
        raise ConformanceError(
            "override invalid_credentials(provider): credentials of its kind it must refuse"
        )

    def foreign_credentials(self, provider: AuthProvider) -> Sequence[Credentials]:
        """Credentials of another kind, which the provider must leave to others (None)."""
        return (
            Credentials("Basic", "YWxhZGRpbjpvcGVuc2VzYW1l", "127.0.0.1"),
            Credentials("Digest", 'username="x", realm="y"', "127.0.0.1"),
        )

    def _authenticate(self, provider: AuthProvider, credentials: Credentials) -> Any:
        return run_async(
            provider.authenticate(credentials), timeout_s=self.timeout_s, what="authenticate"
        )

    # -- the checks -----------------------------------------------------------------------

    def test_entry_point_registers_the_provider(self) -> None:
        if self.entry_point is None:
            pytest.skip("entry_point is not set")
        cls = self.provider_class()
        host = host_for_entry_point(self.entry_point)
        if host.auth_providers.get(cls.name) is not cls:
            names = provided_by(host, self.entry_point, "auth_providers")
            raise ConformanceError(
                f"entry point {self.entry_point!r} does not register {cls.__qualname__} as "
                f"auth provider {cls.name!r} (it registers: {', '.join(names) or 'none'})"
            )

    def test_options_reject_unknown_fields(self) -> None:
        cls = self.provider_class()
        check_options_type(f"auth provider {cls.name!r}", cls.options_type, self.options)

    def test_a_valid_credential_gives_a_principal(self, tmp_path: Path) -> None:
        provider = self.make_provider(tmp_path)
        principal = self._authenticate(provider, self.valid_credentials(provider))
        if not isinstance(principal, Principal):
            raise ConformanceError(
                f"a valid credential gave {principal!r}, not a Principal"
            )
        if not isinstance(principal.id, str) or not principal.id:
            raise ConformanceError("the principal of a valid credential has no id")
        unknown = set(principal.roles) - set(ROLES)
        if unknown:
            raise ConformanceError(
                f"the principal has roles {sorted(unknown)} outside {', '.join(ROLES)}"
            )

    def test_a_foreign_credential_gives_none(self, tmp_path: Path) -> None:
        provider = self.make_provider(tmp_path)
        for credentials in self.foreign_credentials(provider):
            try:
                answer = self._authenticate(provider, credentials)
            except UnauthorizedError as exc:
                raise ConformanceError(
                    f"a {credentials.scheme} credential of another kind was refused ({exc}); "
                    "return None so that the next provider can answer"
                ) from None
            if answer is not None:
                raise ConformanceError(
                    f"a {credentials.scheme} credential of another kind gave {answer!r}; "
                    "return None for credentials that are not this provider's"
                )

    def test_an_invalid_credential_raises_unauthorized(self, tmp_path: Path) -> None:
        provider = self.make_provider(tmp_path)
        invalid = list(self.invalid_credentials(provider))
        if not invalid:
            raise ConformanceError("invalid_credentials returned none to check")
        for credentials in invalid:
            try:
                answer = self._authenticate(provider, credentials)
            except UnauthorizedError as exc:
                token = credentials.token
                if len(token) >= 8 and token in str(exc):
                    raise ConformanceError(
                        "the UnauthorizedError message repeats the credential; say why it "
                        "was refused without echoing the secret"
                    ) from None
                continue
            except Exception as exc:  # noqa: BLE001 - the wrong error is the finding
                raise ConformanceError(
                    f"an invalid credential raised {type(exc).__name__}: {exc}; raise "
                    "UnauthorizedError (401) for a credential of this provider's kind"
                ) from exc
            raise ConformanceError(
                f"an invalid credential ({_redact(credentials.token)}) gave {answer!r}; raise "
                "UnauthorizedError for a credential of this provider's kind that is not valid"
            )

    def test_secrets_are_compared_in_constant_time(self) -> None:
        """A static check of the source: documented as such (it cannot time a comparison)."""
        own = inspect.getmodule(self.provider_class())
        if own is None:
            pytest.skip("the provider's module has no source to read")
        plain = find_plain_secret_comparisons(inspect.getsource(own))
        if plain:
            line, text = plain[0]
            raise ConformanceError(
                f"{own.__name__} line {line} compares a secret with ==/!= ({text}); use "
                "hmac.compare_digest, whose time does not depend on where the bytes differ"
            )
        if not self.compares_secrets:
            return
        names = list(self.secret_comparison_modules) or [own.__name__]
        if not any(_calls_compare_digest(importlib.import_module(n)) for n in names):
            verb = "never calls" if len(names) == 1 else "never call"
            raise ConformanceError(
                f"{', '.join(names)} {verb} hmac.compare_digest or secrets.compare_digest, "
                "yet the provider compares secrets (set compares_secrets = False if it does "
                "not, or name the module that does in secret_comparison_modules)"
            )


def _calls_compare_digest(module: Any) -> bool:
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "compare_digest":
                return True
    return False


def _words(node: ast.expr) -> Iterator[str]:
    """Lower-case parts of the last name in ``node`` (``self._api_key`` -> api, key)."""
    if isinstance(node, ast.Attribute):
        name = node.attr
    elif isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Subscript):
        yield from _words(node.value)
        return
    else:
        return
    parts = [p.lower() for p in re.split(r"_+|(?<=[a-z])(?=[A-Z])", name) if p]
    yield from parts
    yield "".join(parts)  # api_key -> apikey


def find_plain_secret_comparisons(source: str) -> list[tuple[int, str]]:
    """(line, text) of each ``==`` / ``!=`` between a secret-named value and anything but
    None, a number or a flag."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands, operands[1:], strict=False):
            if not isinstance(op, ast.Eq | ast.NotEq):
                continue
            if _harmless(left) or _harmless(right):
                continue
            if any(w in _SECRET_WORDS for side in (left, right) for w in _words(side)):
                found.append((node.lineno, ast.unparse(node)))
    return found


def _harmless(node: ast.expr) -> bool:
    """None, a number or a flag: comparing a secret's shape, not its value."""
    return isinstance(node, ast.Constant) and not isinstance(node.value, str | bytes)


def _redact(token: str) -> str:
    return f"{token[:4]}… ({len(token)} characters)" if len(token) > 4 else "a short token"
