"""Who may call what: authentication, roles, model scopes, rate limits, audit.

One check runs before every route handler (the app's ``before_request`` hook). It looks the
route up in ``POLICIES`` (a route without a policy is refused), asks the auth providers in
order, charges the caller's token bucket, checks the role and the model scope, and leaves the
principal on ``request.state``. A response hook run by the app's ASGI layer
(:class:`~modelyard.api.exchange.Exchange`) adds the RateLimit fields to the response and
audits admin actions with their outcome.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, NoReturn, cast

import msgspec
from litestar import Litestar, Request
from litestar.connection import ASGIConnection
from litestar.params import Dependency
from litestar.routes import HTTPRoute
from litestar.types import Message, Scope

from modelyard.core.audit import AuditLog
from modelyard.core.auth import AuthProvider, Credentials, Principal
from modelyard.core.auth_settings import ANONYMOUS, AuthSettings
from modelyard.core.errors import (
    BadRequestError,
    ConfigError,
    ForbiddenError,
    RateLimitedError,
    UnauthorizedError,
)
from modelyard.core.extensions import ApiExtension
from modelyard.core.metrics import Metrics
from modelyard.core.plugins import PluginHost
from modelyard.core.ratelimit import Decision, LimitedPrincipal, Limiter, RateLimit, RateLimiter

__all__ = [
    "POLICIES",
    "Caller",
    "PUBLIC_PREFIXES",
    "ROLE_PERMISSIONS",
    "Permission",
    "Policy",
    "Security",
    "assert_checked",
    "check_bind",
    "is_loopback",
    "model_allowed",
    "policy_for",
    "principal_of",
    "provide_principal",
]

log = logging.getLogger(__name__)

REALM = "modelyard"
#: Key of the per-request security context in ``scope["state"]``.
_CONTEXT = "modelyard.security"
_PRINCIPAL = "principal"


class Permission(enum.StrEnum):
    PUBLIC = "public"  # asks for no credential: health probes, the API docs
    READ = "read"  # model metadata and lists, within the caller's model scopes
    INSPECT = "inspect"  # server-wide read-only views: /admin GETs, plugins, metrics
    INFER = "infer"  # inference on the models the caller's scopes allow
    OPERATE = "operate"  # load, unload, versions, swap, rollback, canary, cache purge
    ADMIN = "admin"  # anything else that changes the server


ROLE_PERMISSIONS: Mapping[str, frozenset[Permission]] = {
    "admin": frozenset(Permission),
    "operator": frozenset({Permission.READ, Permission.INSPECT, Permission.OPERATE}),
    "user": frozenset({Permission.READ, Permission.INFER}),
    "viewer": frozenset({Permission.READ, Permission.INSPECT}),
}


class Policy(msgspec.Struct, frozen=True):
    """What a route needs: a permission, where its model name is, and its audit action."""

    permission: Permission
    #: ``path``: the ``{name}`` parameter; ``body``: the JSON body's ``model`` member;
    #: ``query``: the ``model`` query parameter (absent: every model, so scoped callers
    #: are refused).
    model: Literal["path", "body", "query"] | None = None
    #: Audit action name; routes with one are audited with their outcome.
    action: str = ""


_R, _I, _N, _O = Permission.READ, Permission.INSPECT, Permission.INFER, Permission.OPERATE
PUBLIC = Policy(Permission.PUBLIC)

#: Every route, one line each: ``"METHOD /path/{param}"`` (Litestar's path template). A route
#: missing here is refused with 403 and fails tests/security/test_integration.py.
POLICIES: Mapping[str, Policy] = {
    "GET /v2/health/live": PUBLIC,
    "GET /v2/health/ready": PUBLIC,
    "GET /v2": Policy(_R),
    "GET /v2/models/{name}": Policy(_R, "path"),
    "GET /v2/models/{name}/versions/{version}": Policy(_R, "path"),
    "GET /v2/models/{name}/ready": Policy(_R, "path"),
    "GET /v2/models/{name}/versions/{version}/ready": Policy(_R, "path"),
    "POST /v2/models/{name}/infer": Policy(_N, "path"),
    "POST /v2/models/{name}/versions/{version}/infer": Policy(_N, "path"),
    "GET /v2/repository/index": Policy(_R),
    "POST /v2/repository/index": Policy(_R),
    "POST /v2/repository/models/{name}/load": Policy(_O, "path", "model.load"),
    "POST /v2/repository/models/{name}/unload": Policy(_O, "path", "model.unload"),
    "GET /v1/models": Policy(_R),
    "GET /v1/plugins": Policy(_I),
    "POST /v1/chat/completions": Policy(_N, "body"),
    "POST /v1/completions": Policy(_N, "body"),
    "POST /v1/embeddings": Policy(_N, "body"),
    "POST /v1/classify": Policy(_N, "body"),
    # Files and batches: callers with INFER use their own (api/batches.py filters by owner;
    # an admin sees all); each line's model is checked against the scopes at batch creation.
    "POST /v1/files": Policy(_N),
    "GET /v1/files": Policy(_N),
    "GET /v1/files/{file_id}": Policy(_N),
    "GET /v1/files/{file_id}/content": Policy(_N),
    "DELETE /v1/files/{file_id}": Policy(_N),
    "POST /v1/batches": Policy(_N),
    "GET /v1/batches": Policy(_N),
    "GET /v1/batches/{batch_id}": Policy(_N),
    "POST /v1/batches/{batch_id}/cancel": Policy(_N),
    "GET /admin/models": Policy(_I),
    "POST /admin/models/{name}/versions": Policy(_O, "path", "version.add"),
    "GET /admin/models/{name}/versions/{version}": Policy(_I, "path"),
    "DELETE /admin/models/{name}/versions/{version}": Policy(_O, "path", "version.unload"),
    "GET /admin/models/{name}/swap/safety": Policy(_I, "path"),
    "POST /admin/models/{name}/swap": Policy(_O, "path", "model.swap"),
    "POST /admin/models/{name}/rollback": Policy(_O, "path", "model.rollback"),
    "POST /admin/models/{name}/canary": Policy(_O, "path", "canary.start"),
    "POST /admin/models/{name}/canary/promote": Policy(_O, "path", "canary.promote"),
    "DELETE /admin/models/{name}/canary": Policy(_O, "path", "canary.stop"),
    "GET /admin/cache": Policy(_I),
    "DELETE /admin/cache": Policy(_O, "query", "cache.purge"),
    "GET /metrics": Policy(_I),
    # The web console (api/ui/, docs/console.md). Its pages and static files hold no data:
    # each page's script asks the routes below, and the API above, with the caller's key.
    "GET /ui": PUBLIC,
    "GET /ui/models": PUBLIC,
    "GET /ui/models/{name}": PUBLIC,
    "GET /ui/playground": PUBLIC,
    "GET /ui/batches": PUBLIC,
    "GET /ui/keys": PUBLIC,
    "GET /ui/plugins": PUBLIC,
    "GET /ui/static/{path}": PUBLIC,
    "GET /ui/api/session": Policy(_R),
    "GET /ui/api/traffic": Policy(_I),
    "GET /ui/api/models/{name}/activity": Policy(_I, "path"),
    # Key administration; the handlers audit key.create / key.revoke with the key's id.
    "GET /ui/api/keys": Policy(Permission.ADMIN),
    "POST /ui/api/keys": Policy(Permission.ADMIN),
    "DELETE /ui/api/keys/{key_id}": Policy(Permission.ADMIN),
}
#: Path prefixes open to everyone: the OpenAPI schema and its viewers.
PUBLIC_PREFIXES = ("/schema",)


def policy_for(method: str, path_template: str) -> Policy | None:
    """The policy of a route; None when it has none (the check then refuses it)."""
    if method == "OPTIONS":
        return PUBLIC  # Litestar's generated handler: it answers ``Allow`` and nothing else
    if any(path_template == p or path_template.startswith(p + "/") for p in PUBLIC_PREFIXES):
        return PUBLIC
    return POLICIES.get(f"{method} {path_template}")


def model_allowed(principal: Principal, model: str) -> bool:
    """Whether the principal's model scopes (names or ``fnmatch`` patterns) cover ``model``."""
    return principal.may_use(model)


def principal_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal | None:
    """The principal the check authenticated for this request (None on public routes); also
    ``request.user`` and ``request.state.principal``."""
    state = connection.scope.get("state") or {}
    found = state.get(_PRINCIPAL)
    return found if isinstance(found, Principal) else None


#: A handler parameter for the caller, from the ``principal`` dependency. Not re-validated:
#: it may be a Principal subclass (an API key with its own rate limit).
Caller = Annotated[Principal, Dependency(skip_validation=True)]


def provide_principal(request: Request[Any, Any, Any]) -> Principal:
    """Dependency ``principal``: the caller (its ``tenant`` scopes the response cache)."""
    return principal_of(request) or Principal(id="", roles=frozenset(), model_scopes=frozenset())


def assert_checked(app: Litestar) -> None:
    """Refuse an app where some route handler would skip ``Security.before_request``.

    Litestar runs only the closest layer's ``before_request`` hook: a controller or handler
    that set its own would silently run without authentication. Checked once at startup.
    """
    hook = app.before_request
    if hook is None:
        raise ConfigError("the app has no before_request hook: every route would be unguarded")
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if handler.resolve_before_request() is not hook:
                raise ConfigError(
                    f"route {route.path} ({handler.handler_name}) sets its own before_request "
                    "hook, which would replace the security check; call the check from it"
                )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to anything


def check_bind(settings: AuthSettings, host: str) -> None:
    """ConfigError when ``settings`` leave auth off and ``host`` is not loopback (unless forced)."""
    if settings.enabled or is_loopback(host) or settings.allow_unauthenticated_non_loopback:
        return
    raise ConfigError(
        f"$.server.host: refusing to serve {host!r} without authentication; configure "
        "[[auth.providers]], bind 127.0.0.1, or set [auth] "
        "allow_unauthenticated_non_loopback = true"
    )


class _Context(msgspec.Struct):
    """What the check leaves for the response hook: RateLimit fields and the audit record."""

    principal: str = ""
    client: str = ""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    action: str = ""


class _ModelMember(msgspec.Struct):
    model: str


class Security:
    """The providers, buckets and audit log of one app; ``before_request`` and
    ``on_response_start`` use them."""

    def __init__(
        self,
        settings: AuthSettings,
        providers: Sequence[AuthProvider] = (),
        *,
        limiter: Limiter | None = None,
        audit: AuditLog | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.providers = list(providers)
        self.limiter: Limiter = limiter if limiter is not None else RateLimiter(clock=clock)
        self.audit = audit if audit is not None else AuditLog(settings.audit_log)
        self._anonymous = Principal(
            id=ANONYMOUS, roles=frozenset(settings.anonymous_roles), model_scopes=None
        )
        #: Set by create_app so refusals show in /metrics (auth failures, rate limiting).
        self.metrics: Metrics | None = None
        #: Policies of plugin routes under /ext/ (see ``allow_extension``).
        self._extension_policies: dict[str, Policy] = {}

    def allow_extension(self, extension: ApiExtension, templates: Iterable[str]) -> None:
        """Give each route of a plugin's extension its policy (``admin`` unless it names one).

        ``templates`` are the mounted routes as ``"METHOD /ext/name/path"``.
        """
        for key in templates:
            method, _, path = key.partition(" ")
            relative = path.removeprefix(extension.prefix) or "/"
            named = extension.permissions.get(f"{method} {relative}", "admin")
            scoped = extension.model_scoped and "{name}" in path
            action = f"ext.{extension.name}" if method != "GET" else ""
            self._extension_policies[key] = Policy(
                Permission(named), "path" if scoped else None, action
            )

    @classmethod
    def from_settings(
        cls,
        settings: AuthSettings,
        plugins: PluginHost,
        *,
        clock: Callable[[], float] = time.monotonic,
        store_url: str | None = None,
    ) -> Security:
        """Build the configured providers (options validated by each provider's own Struct).

        ``store_url`` (``[cluster] store``) keeps the rate-limit buckets in that shared store,
        so a limit holds across every server using it; without it they live in this process.
        """
        providers: list[AuthProvider] = []
        for i, entry in enumerate(settings.providers):
            where = f"$.auth.providers[{i}]"
            provider_cls = plugins.auth_providers.get(entry.provider)
            if provider_cls is None:
                installed = ", ".join(sorted(plugins.auth_providers)) or "none"
                raise ConfigError(
                    f"{where}.provider: unknown auth provider {entry.provider!r}; "
                    f"installed: {installed}"
                )
            try:
                options = msgspec.convert(entry.options, provider_cls.options_type)
            except msgspec.ValidationError as exc:
                raise ConfigError(f"{where}.options: {exc}") from None
            providers.append(provider_cls(options))
        security = cls(settings, providers, clock=clock)
        if store_url:
            security.limiter = security._shared_limiter(store_url, clock)
        return security

    def _shared_limiter(self, store_url: str, clock: Callable[[], float]) -> Limiter:
        from modelyard.cache.redis_limits import SharedRateLimiter

        try:
            return SharedRateLimiter(
                store_url, fallback=RateLimiter(clock=clock), clock=clock,
                on_store_error=self._store_error,
            )
        except ValueError as exc:
            raise ConfigError(f"$.cluster.store: {exc}") from None
        except ConfigError as exc:
            raise ConfigError(f"$.cluster.store: {exc.detail}") from None

    def _store_error(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.shared_store_error("redis", operation)

    async def aclose(self) -> None:
        """Close the rate-limit store's connections (a shared limiter has some)."""
        await self.limiter.aclose()

    @property
    def enabled(self) -> bool:
        return bool(self.providers)

    def policy_of(self, method: str, path_template: str) -> Policy | None:
        """The policy of a route, a plugin's under /ext/ included; None when it has none."""
        return policy_for(method, path_template) or self._extension_policies.get(
            f"{method} {path_template}"
        )

    def check_bind(self, host: str) -> None:
        """Refuse to serve without auth on anything but loopback, unless forced in config."""
        if not self.enabled:
            check_bind(self.settings, host)

    # -- the check before every handler ----------------------------------------------------

    async def before_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        """Authenticate, rate-limit and authorise one request; raise the refusal, or pass.

        Installed as the app's ``before_request`` hook rather than as a Litestar guard: a
        guard is handed a fresh copy of the route handler on every call, a cost paid on the
        event loop for every request. Litestar resolves one ``before_request`` per
        handler (the closest layer's), so ``create_app`` refuses to start when any route
        resolves another (see :func:`assert_checked`).
        """
        scope = connection.scope
        method = str(scope.get("method", ""))
        template = str(scope.get("path_template", ""))
        policy = self.policy_of(method, template)
        if policy is None:
            log.error("no access policy for %s %s: refused", method, template)
            raise ForbiddenError("no access policy covers this route")
        if policy.permission is Permission.PUBLIC:
            return
        client = connection.client.host if connection.client else ""
        target = f"{method} {scope.get('root_path', '')}{scope['path']}"
        context = _Context(client=client)
        scope.setdefault("state", {})[_CONTEXT] = context
        principal = await self._authenticate(connection, client, target, context)
        context.principal = principal.id
        scope["state"][_PRINCIPAL] = principal
        # Litestar's ``request.user``; the response cache keys by its ``tenant``.
        scope["user"] = principal
        await self._charge(principal, client, context)
        self._authorize(principal, policy, client, target)
        await self._check_model(connection, principal, policy, client, target)
        context.action = policy.action

    async def _authenticate(
        self,
        connection: ASGIConnection[Any, Any, Any, Any],
        client: str,
        target: str,
        context: _Context,
    ) -> Principal:
        header = connection.headers.get("authorization", "")
        return await self._authenticate_header(header, client, target, context)

    async def authenticate_socket(
        self,
        connection: ASGIConnection[Any, Any, Any, Any],
        permission: Permission,
        *,
        token: str | None = None,
    ) -> Principal:
        """Authenticate, rate-limit and authorise a WebSocket, which ``before_request`` does
        not see (Litestar runs it for HTTP handlers only).

        The same providers as HTTP: the ``Authorization`` header, else ``token`` (a bearer
        token the client sent in its first message). Raises the refusal like the HTTP check.
        """
        client = connection.client.host if connection.client else ""
        target = f"WEBSOCKET {connection.scope.get('root_path', '')}{connection.scope['path']}"
        context = _Context(client=client)
        header = connection.headers.get("authorization", "") or (
            f"Bearer {token}" if token else ""
        )
        principal = await self._authenticate_header(header, client, target, context)
        await self._charge(principal, client, context)
        self._authorize(principal, Policy(permission), client, target)
        return principal

    async def _authenticate_header(
        self, header: str, client: str, target: str, context: _Context
    ) -> Principal:
        if not self.enabled:
            return self._anonymous
        scheme, _, token = header.strip().partition(" ")
        token = token.strip()
        if not header:
            raise await self._unauthorized(
                UnauthorizedError("credentials required"),
                client,
                target,
                context,
                challenge=f'Bearer realm="{REALM}"',
            )
        if not scheme or not token:
            raise await self._unauthorized(
                UnauthorizedError("malformed Authorization header"), client, target, context
            )
        credentials = Credentials(scheme=scheme, token=token, client_address=client)
        for provider in self.providers:
            try:
                principal = await provider.authenticate(credentials)
            except UnauthorizedError as exc:
                raise await self._unauthorized(exc, client, target, context) from None
            if principal is not None:
                return principal
        raise await self._unauthorized(
            UnauthorizedError("credential not recognised"), client, target, context
        )

    async def _unauthorized(
        self,
        exc: UnauthorizedError,
        client: str,
        target: str,
        context: _Context,
        *,
        challenge: str | None = None,
    ) -> Exception:
        """401 with a WWW-Authenticate challenge (RFC 6750); 429 once a client keeps failing."""
        self.audit.record(
            "auth.failure",
            result="denied",
            target=target,
            client=client,
            status=401,
            detail=exc.detail,
        )
        if self.metrics is not None:
            self.metrics.auth_failure("missing" if challenge else "invalid")
        limit = self.settings.rate_limits.get(ANONYMOUS)
        if limit is not None:
            decision = await self.limiter.charge(f"addr:{client}", limit)
            context.headers = _ratelimit_fields(ANONYMOUS, decision)
            if not decision.allowed:
                self._count_rate_limited()
                return _too_many(decision, context.headers)
        reason = exc.detail.replace("\\", "").replace('"', "'")
        exc.headers.setdefault(
            "WWW-Authenticate",
            challenge
            or f'Bearer realm="{REALM}", error="invalid_token", error_description="{reason}"',
        )
        return exc

    async def _charge(self, principal: Principal, client: str, context: _Context) -> None:
        chosen = self._limit_for(principal)
        if chosen is None:
            return
        policy_name, limit = chosen
        key = f"addr:{client}" if principal is self._anonymous else principal.id
        decision = await self.limiter.charge(key, limit)
        context.headers = _ratelimit_fields(policy_name, decision)
        if not decision.allowed:
            self._count_rate_limited()
            raise _too_many(decision, context.headers)

    def _count_rate_limited(self) -> None:
        if self.metrics is not None:
            self.metrics.rate_limited_request()

    def _limit_for(self, principal: Principal) -> tuple[str, RateLimit] | None:
        """The key's own limit, else the most generous of its roles' (a role without one is
        unlimited), else ``anonymous`` for callers without a principal or a role."""
        if isinstance(principal, LimitedPrincipal) and principal.rate_limit is not None:
            return "key", principal.rate_limit
        limits = self.settings.rate_limits
        if principal is self._anonymous or not principal.roles:
            found = limits.get(ANONYMOUS)
            return None if found is None else (ANONYMOUS, found)
        if any(role not in limits for role in principal.roles):
            return None
        role = max(principal.roles, key=lambda r: (limits[r].rate, limits[r].burst))
        return role, limits[role]

    def _authorize(self, principal: Principal, policy: Policy, client: str, target: str) -> None:
        if any(policy.permission in ROLE_PERMISSIONS.get(r, ()) for r in principal.roles):
            return
        roles = sorted(r for r, perms in ROLE_PERMISSIONS.items() if policy.permission in perms)
        self._deny(f"this needs the role {' or '.join(roles)}", principal, client, target)

    async def _check_model(
        self,
        connection: ASGIConnection[Any, Any, Any, Any],
        principal: Principal,
        policy: Policy,
        client: str,
        target: str,
    ) -> None:
        if policy.model is None or principal.model_scopes is None:
            return
        if policy.model == "path":
            model = str(connection.path_params.get("name", ""))
        elif policy.model == "query":
            model = str(connection.query_params.get("model", ""))
        else:
            model = await _body_model(connection)
        if model_allowed(principal, model):
            return
        self._deny(f"not allowed to use model {model!r}", principal, client, target)

    def _deny(self, detail: str, principal: Principal, client: str, target: str) -> NoReturn:
        """Audit the refusal, then refuse with 403."""
        self.audit.record(
            "access.denied", result="denied", principal=principal.id, target=target,
            client=client, status=403, detail=detail,
        )
        raise ForbiddenError(detail)

    # -- the response hook -----------------------------------------------------------------

    def on_response_start(self, scope: Scope, message: Message) -> None:
        """Response hook (see :class:`~modelyard.api.exchange.Exchange`): RateLimit fields on
        every checked response; the audit record of an admin action with its outcome."""
        state = scope.get("state")
        context = state.get(_CONTEXT) if state else None
        if isinstance(context, _Context):
            self._on_response(scope, message, context)

    def _on_response(self, scope: Scope, message: Message, context: _Context) -> None:
        headers = list(cast("Iterable[tuple[bytes, bytes]]", message.get("headers", [])))
        present = {name.lower() for name, _ in headers}
        for name, value in context.headers.items():
            if name.lower().encode() not in present:
                headers.append((name.lower().encode(), value.encode()))
        message["headers"] = headers  # type: ignore[typeddict-unknown-key]
        if context.action:
            status = int(message.get("status", 0))  # type: ignore[call-overload]
            self.audit.record(
                context.action,
                result="ok" if status < 400 else "failed",
                principal=context.principal,
                target=f"{scope.get('method', '')} {scope['path']}",
                client=context.client,
                status=status,
            )


async def _body_model(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The ``model`` member of a JSON body; the body stays cached for the handler."""
    if not isinstance(connection, Request):
        raise BadRequestError("this route takes a JSON body naming a 'model'")
    try:
        return msgspec.json.decode(await connection.body(), type=_ModelMember).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise BadRequestError(
            "the request body must be a JSON object with a string 'model'"
        ) from None


def _ratelimit_fields(policy: str, decision: Decision) -> dict[str, str]:
    """draft-ietf-httpapi-ratelimit-headers: the policy (quota, window) and what is left."""
    limit = decision.limit
    return {
        "RateLimit-Policy": f'"{policy}";q={limit.burst};w={limit.window_s}',
        "RateLimit": f'"{policy}";r={decision.remaining};t={math.ceil(decision.reset_s)}',
    }


def _too_many(decision: Decision, fields: dict[str, str]) -> RateLimitedError:
    retry_after = max(1, math.ceil(decision.retry_after_s))
    return RateLimitedError(
        f"rate limit exceeded: {decision.limit.burst} requests, refilled at "
        f"{decision.limit.rate:g}/s; retry in {retry_after}s",
        headers={**fields, "Retry-After": str(retry_after)},
    )
