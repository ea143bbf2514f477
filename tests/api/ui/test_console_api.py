"""The console without a browser: its JSON routes, pages and static files over ASGI, the
traffic window and the incident journal with an injected clock, and the files the wheel ships.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from litestar.config.app import AppConfig

from modelyard.api.security import ROLE_PERMISSIONS
from modelyard.api.ui import Console
from modelyard.api.ui.journal import Journal
from modelyard.api.ui.pages import CONTENT_SECURITY_POLICY, PAGES
from modelyard.api.ui.traffic import TrafficWindow, quantile
from modelyard.core.metrics import Metrics
from modelyard.core.plugins import PluginHost
from modelyard.core.ui_settings import UiSettings
from modelyard.core.views import ModelView
from modelyard.plugins import auth as auth_plugin
from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore
from modelyard.testing import FakeClock

UI = Path(__file__).parents[3] / "src" / "modelyard" / "api" / "ui"
ECHO = {"name": "echo", "backend": "echo", "source": ".", "task": "chat"}
OTHER = {"name": "other", "backend": "echo", "source": ".", "task": "chat"}
PAGE_PATHS = ["/ui/models", "/ui/models/echo", "/ui/playground", "/ui/batches", "/ui/keys",
              "/ui/plugins"]

# -- the traffic window -------------------------------------------------------------------


def test_quantile_interpolates_within_its_bucket() -> None:
    buckets = [(0.1, 50.0), (0.5, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.3)  # a quarter into (0.1, 0.5]
    assert quantile(0.99, [(0.1, 10.0), (float("inf"), 20.0)]) == 0.1  # in +Inf: last bound
    assert quantile(0.5, [(0.1, 0.0), (float("inf"), 0.0)]) is None
    assert quantile(0.5, []) is None


def _window(clock: FakeClock, **kwargs: Any) -> tuple[Metrics, TrafficWindow]:
    metrics = Metrics(process=False)
    return metrics, TrafficWindow(metrics, interval_s=2.0, clock=clock,
                                  wall=lambda: 1_700_000_000 + clock(), **kwargs)


def test_rates_and_percentiles_come_from_the_difference_between_readings(
    fake_clock: FakeClock,
) -> None:
    metrics, window = _window(fake_clock)
    v1, v2 = metrics.version("chat", "1", "echo"), metrics.version("chat", "2", "echo")
    v1.request(200, 9.0)  # before the first reading: not in any window
    window.sample()
    assert window.summary(["chat"])[0].requests_per_s is None  # one reading: no rate yet
    for _ in range(18):
        v1.request(200, 0.02)
    v2.request(503, 0.2)
    v2.request(422, 0.2)
    fake_clock.advance(10)
    window.sample()
    [chat] = window.summary(["chat"], window_s=30)
    assert chat.requests_per_s == 2.0
    assert chat.errors_per_s == 0.1  # 5xx only: a 422 is the caller's
    assert chat.versions == {"1": 1.8, "2": 0.2}
    assert chat.statuses == {"200": 18, "422": 1, "503": 1}
    assert chat.p50_ms == pytest.approx(18.333, abs=0.001)  # (0.01, 0.025] bucket
    assert chat.p99_ms == pytest.approx(235.0)  # (0.1, 0.25] bucket: the two 0.2 s answers
    [idle] = window.summary(["idle"])
    assert (idle.requests_per_s, idle.p50_ms) == (0.0, None)


def test_the_summary_window_and_the_series_span(fake_clock: FakeClock) -> None:
    metrics, window = _window(fake_clock, history_s=60)
    bound = metrics.version("chat", "1", "echo")
    window.sample()
    for step in range(40):  # a reading every 2 s for 80 s; 5 requests in the last 10
        fake_clock.advance(2)
        if step >= 35:
            bound.request(200, 0.004)
        window.sample()
    [chat] = window.summary(["chat"], window_s=10)
    assert chat.requests_per_s == 0.5
    series = window.series("chat", span_s=20)
    assert len(series) == 10  # a point per reading within the span
    assert [p.requests_per_s for p in series][-5:] == [0.5, 0.5, 0.5, 0.5, 0.5]
    assert series[-1].at == 1_700_000_000 + fake_clock()
    assert series[-1].p50_ms == pytest.approx(2.5)
    assert len(window.series("chat", span_s=1000)) == 30  # the history keeps 60 s


def test_a_reading_is_due_every_interval(fake_clock: FakeClock) -> None:
    _, window = _window(fake_clock)
    assert window.due() and window.last_wall == 0.0
    window.sample()
    assert not window.due()
    fake_clock.advance(1)
    assert not window.due()
    fake_clock.advance(1)
    assert window.due() and window.last_wall == 1_700_000_000 + 1000.0


# -- the incident journal -----------------------------------------------------------------


def _version(version: str, state: str = "active", *, error: str | None = None,
             breaker: str = "closed", transitions: int = 0) -> dict[str, Any]:
    return {"name": "chat", "version": version, "backend": "echo", "task": "chat",
            "source": ".", "state": state, "phase": state, "progress": 100.0, "error": error,
            "parameters": {}, "breaker": {"state": breaker, "transitions": transitions,
                                          "reason": "failure rate 0.60 >= 0.50"}}


def _model(*versions: dict[str, Any], canary: str | None = None,
           rolled_back: str | None = None) -> ModelView:
    return msgspec.convert({
        "name": "chat", "active_version": "1", "required": True, "versions": list(versions),
        "traffic": {"1": 100.0},
        "canary": {"target": canary, "percent": 10.0, "outcomes": {}} if canary else None,
        "last_canary_rollback": rolled_back,
    }, ModelView)


def test_incidents_are_what_changed_for_the_worse_between_readings() -> None:
    journal = Journal(per_model=3)
    readings = [
        _model(_version("1"), _version("2", "loading")),
        _model(_version("1"), _version("2", "failed", error="weights not found")),
        _model(_version("1", breaker="open", transitions=1), _version("2", "failed",
                                                                       error="weights not found")),
        _model(_version("1", breaker="half_open", transitions=2), _version("3", "ready"),
               canary="3"),
        # the breaker closed, reopened and closed again between two readings
        _model(_version("1", transitions=6), _version("3", "ready"), canary="3"),
        _model(_version("1", transitions=6), _version("3", "ready"),
               rolled_back="error rate 0.50 > 0.10"),
    ]
    for at, reading in enumerate(readings):
        journal.observe([reading], float(at))
    assert [(i.at, i.kind, i.version) for i in journal.recent("chat")] == [
        (5.0, "canary.rolled_back", "3"), (4.0, "breaker.open", "1"), (2.0, "breaker.open", "1"),
    ]  # newest first; the oldest (the failed load at 1.0) fell out of the three kept
    assert journal.recent("chat")[0].detail == "canary rolled back: error rate 0.50 > 0.10"
    assert "failure rate 0.60 >= 0.50" in journal.recent("chat")[2].detail
    assert journal.recent("other") == []


def test_a_failed_version_is_noted_once_and_at_the_first_reading_too() -> None:
    journal = Journal()
    failed = _model(_version("1"), _version("2", "failed", error="boom"))
    journal.observe([failed], 1.0)
    journal.observe([failed], 2.0)
    assert [(i.at, i.kind, i.detail) for i in journal.recent("chat")] == [
        (1.0, "load.failed", "boom")]


# -- over HTTP ----------------------------------------------------------------------------


async def test_pages_are_shells_under_a_strict_csp(start_api: Any) -> None:
    api = await start_api(ECHO)
    home = await api.client.get("/ui")
    assert (home.status_code, home.headers["location"]) == (302, "/ui/models")
    for path in PAGE_PATHS:
        page = await api.client.get(path)
        assert page.status_code == 200, path
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert page.headers["x-frame-options"] == "DENY"
        assert "set-cookie" not in page.headers
        html = page.text
        # No inline script or style for the CSP to refuse: every script has a src.
        assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []
        assert " style=" not in html and "<style" not in html
        assert re.search(r" on[a-z]+=", html) is None
    for page in PAGES:
        assert f'href="{page.url}"' in (await api.client.get("/ui/models")).text


async def test_a_model_name_in_the_url_is_escaped(start_api: Any) -> None:
    api = await start_api(ECHO)
    page = await api.client.get("/ui/models/%3Cimg%20src%3Dx%20onerror%3Dalert(1)%3E")
    assert page.status_code == 200
    assert "<img" not in page.text
    assert 'data-model="&lt;img src=x onerror=alert(1)&gt;"' in page.text


async def test_static_files_revalidate_and_nothing_else_is_served(
    start_api: Any, problem: Callable[[httpx.Response, int], dict[str, Any]]
) -> None:
    api = await start_api(ECHO)
    script = await api.client.get("/ui/static/js/api.js")
    assert script.status_code == 200
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert script.headers["x-content-type-options"] == "nosniff"
    again = await api.client.get("/ui/static/js/api.js",
                                 headers={"If-None-Match": script.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    for path in ("/ui/static/nope.js", "/ui/static/../templates/base.html",
                 "/ui/static/%2e%2e/console.py"):
        problem(await api.client.get(path), 404)


def test_every_file_a_page_or_module_names_is_shipped() -> None:
    shipped = {p.relative_to(UI / "static").as_posix() for p in (UI / "static").rglob("*")
               if p.is_file()}
    named: set[str] = set()
    for template in (UI / "templates").glob("*.html"):
        named |= set(re.findall(r'"/ui/static/([^"{]+)"', template.read_text()))
    for page in PAGES:
        named.add(f"js/pages/{page.slug}.js")
    named.add("js/pages/model.js")
    for module in (UI / "static" / "js").rglob("*.js"):
        for target in re.findall(r'from "(\.[^"]+)"', module.read_text()):
            named.add((module.parent / target).resolve().relative_to(
                (UI / "static").resolve()).as_posix())
    assert named - shipped == set()


def test_the_wheel_ships_the_templates_and_static_files() -> None:
    wheel = pytest.importorskip("hatchling.builders.wheel")
    root = Path(__file__).parents[3]
    included = {f.distribution_path for f in wheel.WheelBuilder(str(root)).recurse_included_files()}
    wanted = {"modelyard/" + p.relative_to(root / "src" / "modelyard").as_posix()
              for folder in ("static", "templates") for p in (UI / folder).rglob("*")
              if p.is_file()}
    assert wanted and wanted <= included


async def test_the_session_says_what_the_caller_may_do(start_api: Any) -> None:
    api = await start_api(ECHO)
    session = (await api.client.get("/ui/api/session")).json()
    assert session == {"auth": False, "principal": "anonymous", "roles": ["admin"],
                       "permissions": ["read", "inspect", "infer", "operate", "admin"],
                       "models": None, "api_keys": False}


async def test_traffic_and_activity(
    start_api: Any, problem: Callable[[httpx.Response, int], dict[str, Any]]
) -> None:
    api = await start_api(ECHO, OTHER)
    await api.client.post("/v1/chat/completions",
                          json={"model": "echo", "messages": [{"role": "user", "content": "x"}]})
    traffic = (await api.client.get("/ui/api/traffic")).json()
    assert traffic["window_s"] == 30.0
    assert [m["model"] for m in traffic["models"]] == ["echo", "other"]
    activity = (await api.client.get("/ui/api/models/echo/activity")).json()
    assert activity["model"] == "echo" and activity["incidents"] == []
    assert set(activity["series"]) == {"at", "requests_per_s", "p50_ms", "p99_ms",
                                       "errors_per_s"}
    problem(await api.client.get("/ui/api/models/nope/activity"), 404)


async def test_the_console_is_off_with_ui_disabled(start_api: Any) -> None:
    api = await start_api(ECHO, ui={"enabled": False})
    for path in ["/ui", "/ui/models", "/ui/static/js/api.js", "/ui/api/session"]:
        assert (await api.client.get(path)).status_code == 404, path
    assert not any(p.startswith("/ui") for p in (await api.client.get("/schema/openapi.json"))
                   .json()["paths"])


async def test_only_the_json_routes_are_in_the_openapi_document(start_api: Any) -> None:
    api = await start_api(ECHO)
    paths = set((await api.client.get("/schema/openapi.json")).json()["paths"])
    assert {p for p in paths if p.startswith("/ui")} == {
        "/ui/api/session", "/ui/api/traffic", "/ui/api/models/{name}/activity",
        "/ui/api/keys", "/ui/api/keys/{key_id}"}


# -- API keys -----------------------------------------------------------------------------


@pytest.fixture
def keyed(plugin_host: PluginHost, tmp_path: Path) -> Any:
    """``await keyed(start_api)``: an app with API-key auth and a key per role."""
    plugin_host.register(auth_plugin, name="auth", source="modelyard")
    database = str(tmp_path / "keys.sqlite3")
    store = KeyStore.open(ApiKeyOptions(database=database))
    keys = {role: store.create(name=role, roles=[role]).key for role in ROLE_PERMISSIONS}
    keys["scoped"] = store.create(name="scoped", roles=["viewer"], models=["echo"]).key

    async def start(start_api: Any) -> tuple[Any, dict[str, dict[str, str]]]:
        api = await start_api(ECHO, OTHER, auth={
            "providers": [{"provider": "apikeys", "options": {"database": database}}],
            "audit_log": str(tmp_path / "audit.jsonl")})
        return api, {role: {"Authorization": f"Bearer {key}"} for role, key in keys.items()}

    try:
        yield start
    finally:
        plugin_host.unregister("auth")


async def test_the_session_of_a_scoped_key(start_api: Any, keyed: Any) -> None:
    api, headers = await keyed(start_api)
    assert (await api.client.get("/ui/api/session")).status_code == 401
    session = (await api.client.get("/ui/api/session", headers=headers["scoped"])).json()
    assert (session["auth"], session["roles"], session["models"], session["api_keys"]) == (
        True, ["viewer"], ["echo"], True)
    assert session["permissions"] == ["read", "inspect"]
    traffic = (await api.client.get("/ui/api/traffic", headers=headers["scoped"])).json()
    assert [m["model"] for m in traffic["models"]] == ["echo"]  # only what its scopes cover
    hidden = await api.client.get("/ui/api/models/other/activity", headers=headers["scoped"])
    assert hidden.status_code == 403


async def test_keys_are_created_listed_and_revoked_by_admins_only(
    start_api: Any, keyed: Any, tmp_path: Path,
    problem: Callable[[httpx.Response, int], dict[str, Any]],
) -> None:
    api, headers = await keyed(start_api)
    body = {"name": "ci", "roles": ["user"], "models": ["echo"], "expires_in_days": 30}
    for role in ("operator", "user", "viewer"):
        problem(await api.client.post("/ui/api/keys", json=body, headers=headers[role]), 403)
    created = await api.client.post("/ui/api/keys", json=body, headers=headers["admin"])
    assert created.status_code == 201, created.text
    issued = created.json()
    key, record = issued["key"], issued["record"]
    assert key.startswith(f"my_{record['id']}_")
    assert (record["name"], record["roles"], record["models"], record["status"]) == (
        "ci", ["user"], ["echo"], "active")
    assert record["expires_at"] - record["created_at"] == pytest.approx(30 * 86400, abs=5)
    listed = await api.client.get("/ui/api/keys", headers=headers["admin"])
    assert key not in listed.text
    assert record["id"] in [k["id"] for k in listed.json()["keys"]]
    use = {"Authorization": f"Bearer {key}"}
    assert (await api.client.get("/v1/models", headers=use)).status_code == 200
    revoked = await api.client.delete(f"/ui/api/keys/{record['id']}", headers=headers["admin"])
    assert revoked.json()["status"] == "revoked"
    assert (await api.client.get("/v1/models", headers=use)).status_code == 401
    problem(await api.client.delete("/ui/api/keys/0000000000000000", headers=headers["admin"]),
            404)
    problem(await api.client.post("/ui/api/keys", json={"name": "x", "roles": []},
                                  headers=headers["admin"]), 400)
    audit = (tmp_path / "audit.jsonl").read_text()
    admin_id = headers["admin"]["Authorization"].split("_")[1]
    assert re.search(rf'"principal":"key:{admin_id}","action":"key.create","target":'
                     rf'"key:{record["id"]}"', audit)
    assert f'"action":"key.revoke","target":"key:{record["id"]}"' in audit
    assert key.split("_", 2)[2] not in audit


async def test_keys_need_an_apikeys_provider(
    start_api: Any, problem: Callable[[httpx.Response, int], dict[str, Any]]
) -> None:
    api = await start_api(ECHO)
    assert "apikeys" in problem(await api.client.get("/ui/api/keys"), 409)["detail"]


# -- the lifespan -------------------------------------------------------------------------


async def test_the_console_reads_while_the_app_runs(
    plugin_host: PluginHost, make_settings: Callable[..., Any], fake_clock: FakeClock
) -> None:
    from modelyard.api.security import Security
    from modelyard.core.service import InferenceService

    broken = {"name": "broken", "backend": "failing", "source": ".", "task": "chat",
              "required": False, "options": {"fail_on_load": True}}
    settings = make_settings(models=[ECHO, broken])
    service = InferenceService(settings, plugin_host)
    await service.start()
    await service.wait_until_loaded()
    naps: list[float] = []
    wake = asyncio.Event()

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        await wake.wait()
        wake.clear()

    console = Console(UiSettings(), service, Security(settings.auth), clock=fake_clock,
                      sleep=sleep)
    console.on_app_init(AppConfig())
    state = console.state
    assert state is not None
    try:
        async with console.lifespan(None):  # type: ignore[arg-type]
            while not naps:  # the first reading, then the sampler's nap
                await asyncio.sleep(0)
            [incident] = state.journal.recent("broken")
            assert (incident.kind, incident.detail) == (
                "load.failed", "failing backend refused to load")
            fake_clock.advance(2)
            wake.set()
            while len(naps) < 2:
                await asyncio.sleep(0)
            assert naps == [2.0, 2.0] and len(state.traffic.series("echo")) == 1
    finally:
        await service.stop()


def test_a_disabled_console_adds_nothing(
    plugin_host: PluginHost, make_settings: Callable[..., Any]
) -> None:
    from modelyard.api.security import Security
    from modelyard.core.service import InferenceService

    settings = make_settings(models=[ECHO])
    config = AppConfig()
    Console(UiSettings(enabled=False), InferenceService(settings, plugin_host),
            Security(settings.auth)).on_app_init(config)
    assert config.route_handlers == [] and config.lifespan == [] and config.dependencies == {}
