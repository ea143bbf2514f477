"""``create_app``: the one place the HTTP application is wired."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any, cast

from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.routes import HTTPRoute
from litestar.types import Message, Scope

from modelyard._version import __version__
from modelyard.api.admin import AdminController
from modelyard.api.batches import BatchesController, batch_jobs
from modelyard.api.cors import Cors
from modelyard.api.events import chat_socket, events_socket
from modelyard.api.exchange import Exchange, ResponseHook
from modelyard.api.observability import MetricsController
from modelyard.api.openai import OpenAIController
from modelyard.api.problems import exception_handlers
from modelyard.api.schema import StrictStructSchemaPlugin, describe_routes
from modelyard.api.security import Permission, Security, assert_checked, provide_principal
from modelyard.api.ui import Console
from modelyard.api.v2 import V2Controller
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing.plugin import add_named_fakes

__all__ = ["create_app", "load_plugins"]


def load_plugins(settings: Settings | None = None) -> PluginHost:
    """A PluginHost with every ``modelyard`` entry point loaded (first-party ones included).

    The fake backends of ``modelyard.testing`` join only when ``settings`` name one of them,
    so a production server never lists them as installed.
    """
    host = PluginHost()
    host.load_entry_points()
    if settings is not None:
        add_named_fakes(host, settings)
    return host


def _openapi() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="modelyard",
        version=__version__,
        path="/schema",
        components=Components(
            security_schemes={
                "apiKey": SecurityScheme(
                    type="http", scheme="bearer", description="A modelyard API key (my_...)"
                ),
                "jwt": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT"),
            }
        ),
        # No document-wide security: each operation declares its own from its access policy
        # (public health probes declare none); see api/schema.py.
    )


def _route_keys(app: Litestar, prefix: str) -> list[str]:
    """``"METHOD /path/{param}"`` of every route mounted under ``prefix``."""
    return [
        f"{method} {route.path_format}"
        for route in app.routes
        if isinstance(route, HTTPRoute) and route.path_format.startswith(prefix)
        for method in sorted(route.methods - {"OPTIONS", "HEAD"})
    ]


def _allow_header(app: Litestar) -> ResponseHook:
    """A response hook that gives ``OPTIONS`` every method of its path in ``Allow``.

    Litestar 2's generated OPTIONS handler lists the methods its path had when the path's
    first handler was registered (litestar#4169, fixed in 3.0): ``OPTIONS /admin/cache``
    answered ``Allow: GET, OPTIONS`` although DELETE is served there too.
    """
    allow = {
        route.path_format: ", ".join(sorted(route.methods)).encode()
        for route in app.routes if isinstance(route, HTTPRoute)
    }

    def hook(scope: Scope, message: Message) -> None:
        if scope.get("method") != "OPTIONS":
            return
        methods = allow.get(str(scope.get("path_template", "")))
        headers = list(cast("Iterable[tuple[bytes, bytes]]", message.get("headers", [])))
        if methods is None or not any(name.lower() == b"allow" for name, _ in headers):
            return  # not the generated handler's answer (a CORS preflight, a 404)
        headers = [(n, v) for n, v in headers if n.lower() != b"allow"]
        message["headers"] = [*headers, (b"allow", methods)]  # type: ignore[typeddict-unknown-key]

    return hook


def create_app(
    settings: Settings,
    *,
    plugins: PluginHost | None = None,
    service: InferenceService | None = None,
    security: Security | None = None,
) -> Litestar:
    """Build the Litestar app; models load in its lifespan, in the background.

    ConfigError when auth is off on a non-loopback address (see ``Security.check_bind``).
    """
    host = plugins if plugins is not None else load_plugins(settings)
    core = service if service is not None else InferenceService(settings, host)
    guard = security if security is not None else Security.from_settings(
        settings.auth, host, store_url=settings.cluster.store
    )
    guard.check_bind(settings.server.host)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await core.start()
        await jobs.start()  # resumes the batch jobs a previous run left unfinished
        try:
            yield
        finally:
            await jobs.stop()
            await core.stop()
            await guard.aclose()  # the shared rate-limit store's connections
            await core.telemetry.aclose()  # flush spans an exporter still holds

    def provide_service() -> InferenceService:
        return core

    jobs = batch_jobs(settings, core)

    guard.metrics = core.telemetry.metrics
    app_state: dict[str, Any] = {"service": core, "security": guard}
    extensions = [
        Router(path=ext.prefix, route_handlers=list(ext.handlers), tags=[f"Plugin: {ext.name}"])
        for ext in host.api_extensions.values()
    ]
    app = Litestar(
        route_handlers=[
            OpenAIController, V2Controller, AdminController, MetricsController, *extensions,
            BatchesController,
            events_socket, chat_socket,  # WebSockets authenticate themselves (api/events.py)
        ],
        dependencies={
            "service": Provide(provide_service, sync_to_thread=False),
            "batches": Provide(lambda: jobs, sync_to_thread=False),
            "principal": Provide(provide_principal, sync_to_thread=False),
        },
        before_request=guard.before_request,
        exception_handlers=exception_handlers,
        request_max_body_size=settings.server.max_body_bytes,
        openapi_config=_openapi(),
        # The web console at /ui (api/ui/; nothing with [ui] enabled = false).
        plugins=[StrictStructSchemaPlugin(), Console(settings.ui, core, guard)],
        lifespan=[lifespan],
        state=State(app_state),
        debug=False,
        # Litestar's default config would replace the root handler the CLI set up (JSON lines).
        logging_config=None,
    )
    for ext in host.api_extensions.values():
        guard.allow_extension(ext, _route_keys(app, ext.prefix))
    assert_checked(app)

    def is_public(method: str, path_template: str) -> bool:
        policy = guard.policy_of(method, path_template)
        return policy is not None and policy.permission is Permission.PUBLIC

    # The schema's security and errors per operation, from the same policies the check uses.
    describe_routes(app, is_public)
    # One layer around Litestar's whole handler, not in ``middleware``: unrouted requests
    # (404, 405) get a request id, an access line and the body rules too; see exchange.py.
    # CORS (off unless ``[cors] allow_origins``): preflights are answered in the exchange
    # layer, before routing and the security check; see api/cors.py.
    cors = Cors(settings.cors) if settings.cors.enabled else None
    app.asgi_handler = Exchange(
        app.asgi_handler, core.telemetry, body_timeout_s=settings.limits.body_timeout_s,
        response_hooks=[
            guard.on_response_start, _allow_header(app),
            *([cors.on_response_start] if cors else []),
        ],
        preflight=cors.preflight if cors else None,
    )
    return app
