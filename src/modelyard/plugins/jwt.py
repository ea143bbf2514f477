"""JWT bearer tokens (PyJWT): how SSO / OIDC deployments plug in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import jwt
from msgspec import Meta, Struct, field

from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.auth_settings import ROLES
from modelyard.core.errors import ConfigError, UnauthorizedError

__all__ = ["JwtOptions", "JwtProvider"]

Algorithm = Literal[
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
]


def _default_algorithms() -> list[Algorithm]:
    return ["RS256"]


class JwtOptions(Struct, forbid_unknown_fields=True, kw_only=True):
    """Options of the ``jwt`` provider; claim names are dotted paths (``realm_access.roles``)."""

    #: Accepted ``alg`` values; a token's header must name one of them.
    algorithms: Annotated[list[Algorithm], Meta(min_length=1)] = field(
        default_factory=_default_algorithms
    )
    #: HS*: the shared secret in a file (preferred), or inline.
    secret_file: str | None = None
    secret: str | None = None
    #: RS*/PS*/ES*/EdDSA: one PEM public key ...
    public_key_file: str | None = None
    #: ... or a JWKS file; keys are picked by ``kid`` and the file is re-read when it changes,
    #: so a rotation job only has to rewrite it.
    jwks_file: str | None = None
    #: Required ``iss`` (recommended).
    issuer: str | None = None
    #: Required ``aud``: the token must name one of these.
    audience: str | list[str] | None = None
    #: Clock skew allowed on ``exp``, ``nbf`` and ``iat``.
    leeway_s: Annotated[float, Meta(ge=0)] = 30.0
    #: Claims that must be present.
    require: list[str] = field(default_factory=lambda: ["exp", "sub"])
    subject_claim: str = "sub"
    #: A list, or a space-separated string (as OAuth ``scope`` is).
    roles_claim: str = "roles"
    #: Model names or patterns the token may use; absent means every model its roles allow.
    models_claim: str = "models"
    #: Cache tenant; absent means the subject.
    tenant_claim: str = "tenant"
    #: IdP group or role names -> modelyard roles (admin, operator, user, viewer).
    role_map: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        symmetric = any(a.startswith("HS") for a in self.algorithms)
        asymmetric = any(not a.startswith("HS") for a in self.algorithms)
        if symmetric and not (self.secret or self.secret_file):
            raise ValueError("HS* algorithms need secret_file (or secret)")
        if asymmetric and not (self.public_key_file or self.jwks_file):
            raise ValueError("RS*/PS*/ES*/EdDSA algorithms need public_key_file or jwks_file")
        bad = sorted(set(self.role_map.values()) - set(ROLES))
        if bad:
            raise ValueError(f"role_map maps to unknown role(s) {bad}; roles are {', '.join(ROLES)}")


class _Jwks:
    """A JWKS file, re-read when its modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: int | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._refresh()

    def _refresh(self) -> None:
        stamp = os.stat(self.path).st_mtime_ns
        if stamp == self._stamp:
            return
        keys = jwt.PyJWKSet.from_json(self.path.read_text()).keys
        self._keys = {str(k.key_id or ""): k for k in keys}
        self._stamp = stamp

    def find(self, kid: str | None) -> jwt.PyJWK | None:
        self._refresh()
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)


class JwtProvider(AuthProvider):
    """Recognises ``Bearer`` tokens shaped like a JWT; verifies signature, iss, aud, exp."""

    name = "jwt"
    options_type = JwtOptions

    def __init__(self, options: JwtOptions) -> None:
        super().__init__(options)
        self.options: JwtOptions = options
        try:
            self._secret = _read(options.secret_file).encode() if options.secret_file else (
                (options.secret or "").encode()
            )
            self._public_key = _read(options.public_key_file) if options.public_key_file else None
            self._jwks = _Jwks(Path(options.jwks_file).expanduser()) if options.jwks_file else None
        except (OSError, jwt.PyJWKError, jwt.PyJWKSetError, ValueError) as exc:
            raise ConfigError(f"jwt provider: {exc}") from None

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        token = credentials.token
        if credentials.scheme.lower() != "bearer" or token.count(".") != 2 or not token.startswith("eyJ"):
            return None
        claims = self._verify(token)
        return self._principal(claims)

    def _verify(self, token: str) -> dict[str, Any]:
        opts = self.options
        try:
            header = jwt.get_unverified_header(token)
            alg = str(header.get("alg", ""))
            if alg not in opts.algorithms:
                raise UnauthorizedError(f"token algorithm {alg!r} is not accepted")
            key = self._key(alg, header.get("kid"))
            require = set(opts.require) | ({"iss"} if opts.issuer else set()) | (
                {"aud"} if opts.audience else set()
            )
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=opts.audience, issuer=opts.issuer,
                leeway=opts.leeway_s, options={"require": sorted(require)},
            )
        except jwt.ExpiredSignatureError:
            raise UnauthorizedError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise UnauthorizedError("token not valid yet") from None
        except jwt.InvalidAudienceError:
            raise UnauthorizedError("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise UnauthorizedError("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise UnauthorizedError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise UnauthorizedError("token signature invalid") from None
        except jwt.PyJWTError:
            raise UnauthorizedError("token malformed") from None
        return claims

    def _key(self, alg: str, kid: object) -> Any:
        if alg.startswith("HS"):
            # Never an asymmetric public key as an HMAC secret: the classic alg confusion.
            return self._secret
        if self._jwks is not None:
            found = self._jwks.find(None if kid is None else str(kid))
            if found is not None:
                return found.key
            if self._public_key is None:
                raise UnauthorizedError("token signed by an unknown key")
        return self._public_key

    def _principal(self, claims: dict[str, Any]) -> Principal:
        opts = self.options
        subject = _claim(claims, opts.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise UnauthorizedError(f"token lacks a {opts.subject_claim!r} string")
        roles = {opts.role_map.get(r, r) for r in _strings(_claim(claims, opts.roles_claim))}
        models = _claim(claims, opts.models_claim)
        tenant = _claim(claims, opts.tenant_claim)
        return Principal(
            id=f"jwt:{subject}",
            roles=frozenset(r for r in roles if r in ROLES),
            model_scopes=None if models is None else frozenset(_strings(models)),
            tenant=tenant if isinstance(tenant, str) and tenant else subject,
        )


def _read(path: str) -> str:
    return Path(path).expanduser().read_text().strip()


def _claim(claims: dict[str, Any], path: str) -> Any:
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return []
