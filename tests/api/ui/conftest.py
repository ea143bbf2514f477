"""Browser fixtures for the console tests: one headless Chromium per test module (Debian's,
through Playwright's ``executable_path``), a fresh context per test, and checks every test
gets for free: no console errors or page errors, and an axe accessibility check on request.

Per module, not per session: Playwright's sync API keeps its event loop marked as running in
the main thread while it is open, so a browser left open for the session would break every
asyncio test collected after these modules.

Screenshots go to the test's temporary directory, or to ``$CONSOLE_SCREENSHOTS``
when set (``CONSOLE_SCREENSHOTS=docs/console`` refreshes the pictures in
docs/console.md).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from litestar import Litestar

from modelyard.testing import LiveServer, run_live_server

AXE = Path(__file__).parent / "vendor" / "axe.min.js"
AXE_PATH = "/__axe__/axe.min.js"  # answered by Playwright's router, never by the server
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 800}
NARROW = {"width": 390, "height": 844}
KEY_STORAGE = "modelyard.console.key"  # static/js/api.js
#: How long a test waits for the page to show something (the machine is small and shared).
TIMEOUT_MS = 20_000
_FAILED_LOAD = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")


@pytest.fixture(scope="module")
def browser(chromium_path: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


def serve_console(app: Litestar) -> Iterator[LiveServer]:
    """Serve ``app`` on 127.0.0.1 until every required model is ready."""
    with run_live_server(app) as server:
        deadline = time.monotonic() + 60
        # Bounded poll of the public readiness probe: models load in the server's loop.
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "the console's server never became ready"
            time.sleep(0.02)
        yield server


@dataclass
class ConsolePage:
    """A browser tab on the console, with what the tab logged."""

    page: Any
    base: str
    shots: Path
    errors: list[str] = field(default_factory=list)
    #: Statuses of failed HTTP loads the browser logged (a 401 before signing in, ...).
    http_errors: list[int] = field(default_factory=list)
    #: Statuses the test provokes on purpose; any other failed load is an error.
    expected_statuses: set[int] = field(default_factory=set)

    def goto(self, path: str) -> None:
        self.page.goto(self.base + path)

    def sign_in_as(self, key: str) -> None:
        """Store ``key`` as the tab's key before its pages load (as the sign-in form does)."""
        self.page.add_init_script(
            f"sessionStorage.setItem({KEY_STORAGE!r}, {key!r});"
        )

    def axe(self) -> list[str]:
        """Serious and critical axe violations of the page as it is now."""
        self.page.add_script_tag(url=self.base + AXE_PATH)
        found: list[dict[str, Any]] = self.page.evaluate(
            """async () => (await axe.run(document, {resultTypes: ['violations']}))
                 .violations.filter(v => ['serious', 'critical'].includes(v.impact))
                 .map(v => ({id: v.id, help: v.help,
                             nodes: v.nodes.map(n => n.target.join(' ')).slice(0, 5)}))"""
        )
        return [f"{v['id']}: {v['help']} at {v['nodes']}" for v in found]

    def assert_accessible(self) -> None:
        violations = self.axe()
        assert not violations, "\n".join(violations)

    def shot(self, name: str, *, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page, animations="disabled")
        return path

    def _on_console(self, message: Any) -> None:
        if message.type not in ("error", "warning"):
            return
        failed = _FAILED_LOAD.search(message.text)
        if failed:
            self.http_errors.append(int(failed[1]))
        else:
            self.errors.append(f"{message.type}: {message.text}")

    def check_clean(self) -> None:
        assert not self.errors, "the page logged errors:\n" + "\n".join(self.errors)
        unexpected = [s for s in self.http_errors if s not in self.expected_statuses]
        assert not unexpected, f"unexpected failed requests: {unexpected}"


@pytest.fixture
def open_console(
    browser: Any, tmp_path: Path
) -> Iterator[Callable[..., ConsolePage]]:
    """``open_console(server, viewport=DESKTOP)``: a fresh tab (own session storage); at the
    end of the test it must have logged no errors."""
    contexts: list[Any] = []
    pages: list[ConsolePage] = []
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)

    def open_(server: LiveServer, viewport: dict[str, int] = DESKTOP) -> ConsolePage:
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        context.route(f"**{AXE_PATH}", lambda route: route.fulfill(
            path=str(AXE), content_type="text/javascript"))
        page = context.new_page()
        tab = ConsolePage(page, server.url, shots)
        page.on("console", tab._on_console)
        page.on("pageerror", lambda error: tab.errors.append(f"page error: {error}"))
        pages.append(tab)
        return tab

    try:
        yield open_
        for tab in pages:
            tab.check_clean()
    finally:
        for context in contexts:
            context.close()
