"""The console's pages (server-rendered HTML shells) and its static files.

Pages carry no server data: a browser cannot send the API key with a page load (the key is a
bearer token, never a cookie, so nothing here can be forged cross-site). Each page's ES module
asks the JSON API for what the key may see and fills the page in. Pages and static files are
therefore public routes; everything they show comes from authenticated calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar import Controller, Request, Response, get
from litestar.response import Redirect

from modelyard._version import __version__
from modelyard.api.ui.state import ConsoleDep
from modelyard.core.errors import NotFoundError

__all__ = ["CONTENT_SECURITY_POLICY", "MODEL_PAGE", "PAGES", "PagesController", "static_file"]

#: No inline script or style, nothing from another origin, no framing, no plugins.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "form-action 'self'",
    "base-uri 'none'",
    "frame-ancestors 'none'",
])
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Page:
    """One page of the console: its URL segment, title, template and the permission it needs."""

    slug: str
    title: str
    needs: str
    template: str = ""

    @property
    def url(self) -> str:
        return f"/ui/{self.slug}"


#: The navigation, in order. ``needs`` is the permission (api/security.py) the page's data
#: asks for; the page's script hides what the key's role may not use.
PAGES = (
    Page("models", "Models", "inspect"),
    Page("playground", "Playground", "infer"),
    Page("batches", "Batch jobs", "infer"),
    Page("keys", "API keys", "admin"),
    Page("plugins", "Plugins", "inspect"),
)
_BY_SLUG = {page.slug: page for page in PAGES}
#: One model's page (not in the navigation: reached from the models page).
MODEL_PAGE = Page("model", "Model", "inspect")


def _render(console: ConsoleDep, page: Page, **context: Any) -> Response[str]:
    title = context.pop("title", page.title)
    html = console.assets.render(
        f"{page.slug}.html", page=page, pages=PAGES, title=title, version=__version__,
        **context,
    )
    return Response(html, media_type="text/html", headers=_PAGE_HEADERS)


class PagesController(Controller):
    path = "/ui"
    include_in_schema = False

    @get("")
    async def home(self) -> Redirect:
        return Redirect("/ui/models")

    @get("/models")
    async def models(self, console: ConsoleDep) -> Response[str]:
        return _render(console, _BY_SLUG["models"])

    @get("/models/{name:str}")
    async def model(self, name: str, console: ConsoleDep) -> Response[str]:
        return _render(console, MODEL_PAGE, title=f"Model {name}", model=name)

    @get("/playground")
    async def playground(self, console: ConsoleDep) -> Response[str]:
        return _render(console, _BY_SLUG["playground"])

    @get("/batches")
    async def batches(self, console: ConsoleDep) -> Response[str]:
        return _render(console, _BY_SLUG["batches"])

    @get("/keys")
    async def keys(self, console: ConsoleDep) -> Response[str]:
        return _render(console, _BY_SLUG["keys"])

    @get("/plugins")
    async def plugins(self, console: ConsoleDep) -> Response[str]:
        return _render(console, _BY_SLUG["plugins"])


@get("/ui/static/{path:path}", include_in_schema=False)
async def static_file(
    path: str, console: ConsoleDep, request: Request[Any, Any, Any]
) -> Response[bytes]:
    """A file shipped under ``api/ui/static`` (revalidated by ETag on every use)."""
    found = console.assets.static(path)
    if found is None:
        raise NotFoundError(f"the console has no file {path!r}")
    headers = {
        "ETag": found.etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff",
    }
    if request.headers.get("if-none-match") == found.etag:
        return Response(b"", status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)
