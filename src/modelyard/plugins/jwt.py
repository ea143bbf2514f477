"""JWT bearer tokens (PyJWT): how SSO / OIDC deployments plug in."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import jwt
from msgspec import Meta, Struct, field

from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.auth_settings import ROLES
from modelyard.core.errors import ConfigError, UnauthorizedError
from modelyard.plugins._jwks import KeysUnavailable, RemoteJwks, check_url

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
    #: so a rotation job only has to rewrite it ...
    jwks_file: str | None = None
    #: ... or a JWKS fetched from this URL ...
    jwks_url: str | None = None
    #: ... or from the ``jwks_uri`` of this OIDC issuer's discovery document
    #: (``{issuer_url}/.well-known/openid-configuration``); tokens' ``iss`` must then equal it
    #: unless ``issuer`` says otherwise.
    issuer_url: str | None = None
    #: Fetching keys: plain http is refused except to loopback hosts, unless this is set.
    allow_insecure_http: bool = False
    #: Per request (discovery, key set) as a whole.
    jwks_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 5.0
    #: How long a fetched key set is used before it is refetched (less if its
    #: ``Cache-Control: max-age`` says so).
    jwks_cache_s: Annotated[float, Meta(ge=0)] = 300.0
    #: At most one fetch per this many seconds, however many unknown ``kid``s tokens name.
    jwks_min_refresh_s: Annotated[float, Meta(ge=0)] = 30.0
    #: While the issuer cannot be reached, an expired key set still answers for this long.
    jwks_stale_s: Annotated[float, Meta(ge=0)] = 3600.0
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
        sources = [name for name in _KEY_SOURCES if getattr(self, name)]
        if len(sources) > 1:
            raise ValueError(f"give one key source, not {' and '.join(sources)}")
        if asymmetric and not sources:
            raise ValueError(
                "RS*/PS*/ES*/EdDSA algorithms need public_key_file or jwks_file, "
                "or jwks_url or issuer_url to fetch the keys"
            )
        for name in ("jwks_url", "issuer_url"):
            url = getattr(self, name)
            if url:
                check_url(url, allow_insecure_http=self.allow_insecure_http)
        bad = sorted(set(self.role_map.values()) - set(ROLES))
        if bad:
            raise ValueError(
                f"role_map maps to unknown role(s) {bad}; roles are {', '.join(ROLES)}"
            )

    @property
    def expected_issuer(self) -> str | None:
        """The ``iss`` tokens must carry: ``issuer``, else ``issuer_url``."""
        return self.issuer or self.issuer_url


_KEY_SOURCES = ("public_key_file", "jwks_file", "jwks_url", "issuer_url")


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

    def __init__(
        self, options: JwtOptions, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
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
        self._remote: RemoteJwks | None = None
        if options.jwks_url or options.issuer_url:
            # Fetched on the first token, not here: the provider is built outside the event loop.
            self._remote = RemoteJwks(
                jwks_url=options.jwks_url, issuer_url=options.issuer_url,
                timeout_s=options.jwks_timeout_s, cache_s=options.jwks_cache_s,
                min_refresh_s=options.jwks_min_refresh_s, stale_s=options.jwks_stale_s,
                allow_insecure_http=options.allow_insecure_http, clock=clock,
            )

    async def authenticate(self, credentials: Credentials) -> Principal | None:
        token = credentials.token
        if credentials.scheme.lower() != "bearer" or token.count(".") != 2:
            return None
        if not token.startswith("eyJ"):
            return None
        header = self._header(token)
        key = await self._key(header["alg"], header.get("kid"))
        claims = self._verify(token, header["alg"], key)
        return self._principal(claims)

    def _header(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise UnauthorizedError("token malformed") from None
        alg = str(header.get("alg", ""))
        if alg not in self.options.algorithms:
            raise UnauthorizedError(f"token algorithm {alg!r} is not accepted")
        return {**header, "alg": alg}

    def _verify(self, token: str, alg: str, key: Any) -> dict[str, Any]:
        opts = self.options
        issuer = opts.expected_issuer
        try:
            require = set(opts.require) | ({"iss"} if issuer else set()) | (
                {"aud"} if opts.audience else set()
            )
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=opts.audience, issuer=issuer,
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

    async def _key(self, alg: str, kid: object) -> Any:
        if alg.startswith("HS"):
            # Never an asymmetric public key as an HMAC secret: the classic alg confusion.
            return self._secret
        kid = None if kid is None else str(kid)
        if self._remote is not None:
            try:
                found = await self._remote.find(kid, alg)
            except KeysUnavailable:
                # Fail closed; why the fetch failed (and from where) is in the log only.
                raise UnauthorizedError("token signing keys unavailable") from None
            if found is None:
                raise UnauthorizedError("token signed by an unknown key")
            return found
        if self._jwks is not None:
            try:
                jwk = self._jwks.find(kid)
            except jwt.PyJWTError:  # a half-written file mid-rotation, say
                raise UnauthorizedError("token malformed") from None
            if jwk is None:
                raise UnauthorizedError("token signed by an unknown key")
            return jwk.key
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
