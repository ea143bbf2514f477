"""The ``modelyard`` command line, in-process through click's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from modelyard import __version__
from modelyard.api.app import create_app
from modelyard.cli import cli
from modelyard.core.plugins import ALLOW_ENV, PluginHost
from modelyard.core.settings import load_settings
from modelyard.testing import plugin as fake_plugin
from modelyard.testing import run_live_server

EXAMPLE = Path(__file__).parents[1] / "examples" / "echo.toml"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (ALLOW_ENV, "MODELYARD_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def run(*args: str, **env: str) -> Result:
    # A wide terminal so rich tables do not wrap names.
    return CliRunner().invoke(cli, list(args), env={"COLUMNS": "240", **env})


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "modelyard.toml"
    path.write_text(text)
    return str(path)


BAD_BACKEND = """
[[models]]
name = "a"
backend = "echo"
source = "."

[[models]]
name = "b"
backend = "onx"
source = "model.onnx"
"""


# -- plugins ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("tiny_plugins")
def test_plugins_json_lists_loaded_and_failed_plugins() -> None:
    result = run("plugins", "--json")
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["tiny"]["status"] == "loaded"
    assert records["tiny"]["backends"] == ["tiny"]
    assert records["tiny"]["source"] == "modelyard-tiny"
    assert records["broken"]["status"] == "failed"
    assert "ImportError: tinybroken needs libfoo.so" in records["broken"]["error"]
    assert records["sources"]["status"] == "loaded"
    assert "testing" not in records  # the fakes join a server only when its config names one


@pytest.mark.usefixtures("tiny_plugins")
def test_plugins_json_honours_the_allow_list() -> None:
    result = run("plugins", "--json", **{ALLOW_ENV: "tiny"})
    records = {r["name"]: r["status"] for r in json.loads(result.stdout)}
    assert records["tiny"] == "loaded"
    assert records["broken"] == "skipped"
    assert records["sources"] == "skipped"


@pytest.mark.usefixtures("tiny_plugins")
def test_plugins_table() -> None:
    result = run("plugins")
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines()
            if line.count("│") >= 5}
    assert "loaded" in rows["tiny"] and "backend:tiny" in rows["tiny"]
    assert "modelyard-tiny 1.2.3" in rows["tiny"]
    assert "failed" in rows["broken"]
    assert "source:pypi" in rows["sources"] and "source:demo" in rows["sources"]


@pytest.mark.usefixtures("tiny_plugins")
def test_plugins_reports_an_allow_listed_name_that_is_not_installed() -> None:
    records = {r["name"]: r for r in json.loads(run("plugins", "--json",
                                                     **{ALLOW_ENV: "tiny,tinny"}).stdout)}
    assert records["tiny"]["status"] == "loaded"
    assert records["tinny"]["status"] == "missing"
    assert "'tinny'" in records["tinny"]["error"]
    table = run("plugins", **{ALLOW_ENV: "tiny,tinny"})
    row = next(line for line in table.stdout.splitlines() if "│ tinny " in line)
    assert "missing" in row


def test_plugins_table_prints_errors_with_brackets_whole(install_plugin: Any) -> None:
    install_plugin("modelyard-bracketed", modules={"bracketedplug": """
        raise ImportError("needs the [gpu] extra: pip install 'modelyard[gpu]'")
    """}, entry_points={"bracketed": "bracketedplug"})
    result = run("plugins")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "needs the [gpu] extra: pip install 'modelyard[gpu]'" in text


# -- models -----------------------------------------------------------------------------------


def test_models_lists_the_configured_versions(tmp_path: Path) -> None:
    config = _config(tmp_path, """
[[models]]
name = "m"
backend = "echo"
source = "."
task = "chat"

[[models]]
name = "m"
version = "2"
backend = "echo"
source = "."
task = "chat"
active = true

[[models]]
name = "auto"
backend = "echo"
source = "."
""")
    result = run("models", "--config", config)
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("│")]
    assert "┃ model ┃ version ┃ backend ┃ task" in result.stdout
    here = str(tmp_path)  # "." is the config file's directory, not the working directory
    assert ["m", "1", "echo", "chat", "", here] in rows
    assert ["m", "2", "echo", "chat", "yes", here] in rows
    assert ["auto", "1", "echo", "(detect)", "yes", here] in rows


def test_models_reads_modelyard_config_from_the_environment() -> None:
    result = run("models", MODELYARD_CONFIG=str(EXAMPLE))
    assert result.exit_code == 0, result.output
    for name in ("echo", "echo-embed", "doubler"):
        assert f"│ {name} " in result.stdout


def test_models_with_a_bad_config_exits_1_with_the_problem(tmp_path: Path) -> None:
    result = run("models", "--config", _config(tmp_path, BAD_BACKEND))
    assert result.exit_code == 1
    assert "$.models[1].backend: unknown backend 'onx'" in result.stderr


def test_models_url_shows_live_states() -> None:
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing")
    app = create_app(load_settings(EXAMPLE, env={}), plugins=host)
    with run_live_server(app) as server:
        deadline = time.monotonic() + 10
        while httpx.get(f"{server.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        result = run("models", "--url", server.url)
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("│")]
    assert ["doubler", "1", "echo", "tensor", "active", "100%", "fake=True"] in rows


def test_models_url_that_cannot_be_reached_exits_1() -> None:
    result = run("models", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_serve_with_a_bad_config_exits_1_before_binding(tmp_path: Path) -> None:
    result = run("serve", "--config", _config(tmp_path, BAD_BACKEND), "--port", "1")
    assert result.exit_code == 1
    assert "$.models[1].backend: unknown backend 'onx'" in result.stderr


# -- config check -------------------------------------------------------------------------------


def test_config_check_ok() -> None:
    result = run("config", "check", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{EXAMPLE}: ok (3 model version(s))"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        (BAD_BACKEND, {}, "$.models[1].backend: unknown backend 'onx'; installed: "),
        ("[server]\nprot = 1\n", {}, "$.server: unknown field `prot`"),
        ('[server]\nport = "high"\n', {}, "$.server.port: Expected `int`, got `str`"),
        ("[server\n", {}, "invalid TOML"),
        ("", {"MODELYARD_SERVER__PROT": "1"},
         "MODELYARD_SERVER__PROT: server.prot does not name a setting"),
        ('[[models]]\nname = "m"\nbackend = "echo"\nsource = "."\noptions = { dims = 3 }\n', {},
         "$.models[0].options: unknown field `dims`"),
    ],
)
def test_config_check_fails_with_the_message(
    tmp_path: Path, text: str, env: dict[str, str], expected: str
) -> None:
    config = _config(tmp_path, text)
    result = run("config", "check", config, **env)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"{config}: {expected}")
    assert "Traceback" not in result.output


def test_config_check_env_override_is_applied() -> None:
    result = run("config", "check", str(EXAMPLE), MODELYARD_SERVER__PORT="nine")
    assert result.exit_code == 1
    assert "$.server.port: Expected `int`, got `str`" in result.stderr


def test_config_check_of_a_missing_file(tmp_path: Path) -> None:
    result = run("config", "check", str(tmp_path / "nope.toml"))
    assert result.exit_code == 1
    assert "cannot read config" in result.stderr


# -- entry points ---------------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_python_dash_m_modelyard_help() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "modelyard", "--help"], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    for command in ("serve", "plugins", "models", "config"):
        assert command in done.stdout


def test_unknown_command_exits_2() -> None:
    result = run("serv")
    assert result.exit_code == 2
    assert "No such command" in result.stderr


# -- serve ------------------------------------------------------------------------------------


def test_serve_refusing_to_bind_without_auth_prints_the_config_it_asks_for() -> None:
    result = run("serve", "--config", str(EXAMPLE), "--host", "0.0.0.0")
    assert result.exit_code == 1
    # Rich markup would eat "[[auth.providers]]" and "[auth]": the message must arrive whole.
    message = " ".join(result.stderr.split())
    assert "configure [[auth.providers]], bind 127.0.0.1, or set [auth] " \
        "allow_unauthenticated_non_loopback = true" in message
    assert message.startswith("error: $.server.host: refusing to serve '0.0.0.0'")
