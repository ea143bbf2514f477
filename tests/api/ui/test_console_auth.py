"""The console with auth on: it asks for a key, keeps it in the tab, offers only what the key's
role may do (the server still refuses the rest), and lets admins create and revoke keys."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings
from modelyard.plugins import auth as auth_plugin
from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore
from modelyard.testing import LiveServer
from modelyard.testing import plugin as fake_plugin

from .conftest import KEY_STORAGE, ConsolePage, serve_console

expect = pytest.importorskip("playwright.sync_api").expect


ROLES = ("admin", "operator", "user", "viewer")


@dataclass
class Secured:
    server: LiveServer
    keys: dict[str, str]
    audit: Path

    @property
    def url(self) -> str:
        return self.server.url

    def bearer(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    root = tmp_path_factory.mktemp("secured")
    database = str(root / "keys.sqlite3")
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing", source="modelyard.testing")
    host.register(auth_plugin, name="auth", source="modelyard")
    settings = decode_settings({
        "models": [
            {"name": "echo", "backend": "echo", "source": ".", "task": "chat", "version": "1"},
            {"name": "echo", "backend": "echo", "source": ".", "task": "chat", "version": "2"},
        ],
        "auth": {"providers": [{"provider": "apikeys", "options": {"database": database}}],
                 "audit_log": str(root / "audit.jsonl")},
        "cache_dir": str(root / "cache"),
        "batches": {"data_dir": str(root / "batches")},
    }, env={})
    store = KeyStore.open(ApiKeyOptions(database=database))
    keys = {role: store.create(name=f"{role} key", roles=[role]).key for role in ROLES}
    for server in serve_console(create_app(settings, plugins=host)):
        yield Secured(server, keys, root / "audit.jsonl")


def _tab(open_console: Any, secured: Secured, role: str | None = None) -> ConsolePage:
    tab: ConsolePage = open_console(secured.server)
    if role is not None:
        tab.sign_in_as(secured.keys[role])
    return tab


def test_the_console_asks_for_a_key_and_refuses_a_bad_one(
    open_console: Any, secured: Secured
) -> None:
    tab = _tab(open_console, secured)
    tab.expected_statuses.add(401)  # the tab's first question, asked without a key
    tab.goto("/ui/models")
    page = tab.page
    form = page.locator("#sign-in")
    expect(form).to_be_visible()
    expect(page.locator("#content")).to_be_hidden()
    tab.assert_accessible()
    tab.shot("sign-in")
    page.get_by_label("API key", exact=True).fill("my_0000000000000000_" + "x" * 43)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That key was refused: API key")
    page.get_by_label("API key", exact=True).fill(secured.keys["operator"])
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator('#models-body tr[data-model="echo"]')).to_contain_text("active")
    key_id = secured.keys["operator"].split("_")[1]
    expect(page.locator("#who-name")).to_have_text(f"key:{key_id} · operator")
    # Kept in the tab's session storage, never in a cookie: nothing a forged request carries.
    assert page.evaluate(f"sessionStorage.getItem({KEY_STORAGE!r})") == secured.keys["operator"]
    assert page.context.cookies() == []
    expect(page.locator("#live")).to_have_text(re.compile("^Live"))  # the socket took the key
    page.get_by_role("button", name="Sign out").click()
    expect(form).to_be_visible()


def test_an_admin_creates_a_key_shown_once_then_revokes_it(
    open_console: Any, secured: Secured
) -> None:
    tab = _tab(open_console, secured, "admin")
    tab.goto("/ui/keys")
    page = tab.page
    page.get_by_label("Name", exact=True).fill("ci pipeline")
    page.get_by_label("operator", exact=True).check()
    page.get_by_label("user", exact=True).uncheck()
    page.get_by_label("Models (optional)").fill("echo, chat-*")
    page.get_by_role("button", name="Create key").click()
    shown = page.locator("#new-key-value")
    expect(shown).to_have_text(re.compile(r"^my_[0-9a-f]{16}_\S{43}$"))
    key = shown.inner_text()
    key_id = key.split("_")[1]
    row = page.locator(f'#keys-body tr[data-key="{key_id}"]')
    expect(row).to_contain_text("ci pipeline")
    expect(row).to_contain_text("chat-*, echo")
    expect(row).to_contain_text("active")
    assert key not in page.locator("#keys-body").inner_text()  # listed without its secret
    tab.assert_accessible()
    tab.shot("keys")
    works = httpx.get(f"{secured.url}/admin/models", headers={"Authorization": f"Bearer {key}"})
    assert works.status_code == 200
    page.get_by_role("button", name="I have stored it").click()
    expect(page.locator("#new-key")).to_be_hidden()
    page.reload()
    expect(row).to_contain_text("active")
    assert key not in page.content()  # shown once: gone after a reload
    row.get_by_role("button", name=re.compile("^Revoke key")).click()
    page.locator("#confirm-dialog").get_by_role("button", name="Revoke").click()
    expect(row).to_contain_text("revoked")
    refused = httpx.get(f"{secured.url}/admin/models", headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401
    audited = secured.audit.read_text()
    assert '"action":"key.create"' in audited and f'"target":"key:{key_id}"' in audited
    assert '"action":"key.revoke"' in audited


def test_a_viewer_is_not_offered_what_it_may_not_do(open_console: Any, secured: Secured) -> None:
    tab = _tab(open_console, secured, "viewer")
    tab.goto("/ui/models/echo")
    page = tab.page
    expect(page.locator('#versions-body tr[data-version="2"]')).to_contain_text("ready")
    expect(page.get_by_role("button", name="Swap to 2")).to_have_count(0)
    expect(page.get_by_role("button", name="Roll back")).to_be_hidden()
    expect(page.locator("#add-version")).to_be_hidden()
    nav = page.get_by_role("navigation", name="Console")
    expect(nav.get_by_role("link")).to_have_text(["Models", "Plugins"])
    tab.assert_accessible()
    # Not offered, and refused all the same when asked directly.
    refused = httpx.post(f"{secured.url}/admin/models/echo/swap", json={"to": "2"},
                         headers=secured.bearer("viewer"))
    assert refused.status_code == 403


def test_an_operator_may_swap_but_not_manage_keys(open_console: Any, secured: Secured) -> None:
    tab = _tab(open_console, secured, "operator")
    tab.goto("/ui/models/echo")
    page = tab.page
    expect(page.get_by_role("button", name="Swap to 2")).to_be_visible()
    nav = page.get_by_role("navigation", name="Console")
    expect(nav.get_by_role("link")).to_have_text(["Models", "Plugins"])
    tab.goto("/ui/keys")
    expect(page.locator("#denied")).to_contain_text("may administer the server")
    expect(page.locator("#content")).to_be_hidden()


def test_a_user_gets_the_playground_not_the_models(open_console: Any, secured: Secured) -> None:
    tab = _tab(open_console, secured, "user")
    tab.goto("/ui/models")
    page = tab.page
    denied = page.locator("#denied")
    expect(denied).to_contain_text("this key has user")
    denied.get_by_role("link", name="Playground").click()
    page.get_by_label("Message").fill("with a bearer key")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("#transcript li.assistant")).to_have_text("assistantwith a bearer key")
    curl = page.locator("#snippet-curl").inner_text()
    assert '-H "Authorization: Bearer $MODELYARD_API_KEY"' in curl
    assert secured.keys["user"] not in curl  # the snippet never carries the key itself
    assert 'api_key=os.environ["MODELYARD_API_KEY"]' in page.locator("#snippet-python").inner_text()
