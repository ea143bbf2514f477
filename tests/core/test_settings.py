"""Configuration: every error names the path and the problem; env overrides are typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelyard import Backend, Task
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import Settings, decode_settings, load_settings, resolve_models

EXAMPLE = Path(__file__).parents[2] / "examples" / "echo.toml"


def _model(name: str = "m", **extra: Any) -> dict[str, Any]:
    return {"name": name, "backend": "echo", "source": ".", **extra}


def _config_error(raw: Any, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        decode_settings(raw, env=env or {})
    return caught.value.detail


def _resolve_error(host: PluginHost, raw: Any) -> str:
    settings = decode_settings(raw, env={})
    with pytest.raises(ConfigError) as caught:
        resolve_models(settings, host.backends)
    return caught.value.detail


class EmbedOnly(Backend):
    name = "embed-only"
    tasks = frozenset({Task.EMBEDDINGS})


# -- decoding --------------------------------------------------------------------------------


def test_the_example_config_decodes_and_resolves(plugin_host: PluginHost) -> None:
    settings = load_settings(EXAMPLE, env={})
    specs = resolve_models(settings, plugin_host.backends)

    assert [(s.name, s.version, s.task) for s in specs] == [
        ("echo", "1", Task.CHAT), ("echo-embed", "1", Task.EMBEDDINGS),
        ("doubler", "1", Task.TENSOR),
    ]
    assert all(s.active for s in specs)
    assert specs[1].options.dim == 16  # options converted into the backend's Struct
    assert settings.server.port == 8000


def test_an_empty_config_is_valid() -> None:
    settings = decode_settings("", env={})
    assert settings.models == []
    assert settings.server.request_timeout_s > 0


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"server": {"prot": 9000}}, "$.server: unknown field `prot`"),
        ({"sever": {}}, "$: unknown field `sever`"),
        ({"server": {"port": "x"}}, "$.server.port: Expected `int`, got `str`"),
        ({"server": {"port": 70000}}, "$.server.port: Expected `int` <= 65535"),
        ({"server": {"max_body_bytes": 10}}, "$.server.max_body_bytes: Expected `int` >= 1024"),
        ({"models": [_model(), _model(nme="x")]}, "$.models[1]: unknown field `nme`"),
        ({"models": [{"name": "m", "source": "."}]},
         "$.models[0]: Object missing required field `backend`"),
        ({"models": [_model(task="chatt")]}, "$.models[0].task: Invalid enum value 'chatt'"),
        ({"models": [_model(name="bad name")]}, "$.models[0].name: Expected `str` matching regex"),
        ({"models": [_model(batching={"max_batch_size": 0})]},
         "$.models[0].batching.max_batch_size: Expected `int` >= 1"),
        ({"models": [_model(batching={"max_queue_delay": 5})]},
         "$.models[0].batching: unknown field `max_queue_delay`"),
    ],
)
def test_decode_errors_name_the_path_and_the_problem(raw: dict[str, Any], expected: str) -> None:
    assert _config_error(raw).startswith(expected)


def test_toml_text_errors_say_invalid_toml() -> None:
    assert _config_error("[server\nport = 1").startswith("invalid TOML:")


def test_toml_text_with_a_typo_names_the_path() -> None:
    assert _config_error('[server]\nhots = "0.0.0.0"\n') == "$.server: unknown field `hots`"


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(tmp_path / "missing.toml", env={})


# -- environment overrides ----------------------------------------------------------------


def test_env_overrides_are_typed() -> None:
    settings = decode_settings(
        {"server": {"port": 1}},
        env={
            "MODELYARD_SERVER__PORT": "9000",
            "MODELYARD_SERVER__HOST": "0.0.0.0",
            "MODELYARD_SERVER__REQUEST_TIMEOUT_S": "2.5",
            "MODELYARD_CACHE_DIR": "/var/cache/my",
            "MODELYARD_PLUGINS": "not-a-setting-but-reserved",
            "OTHER_VAR": "ignored",
        },
    )
    assert settings.server.port == 9000 and type(settings.server.port) is int
    assert settings.server.host == "0.0.0.0"
    assert settings.server.request_timeout_s == 2.5
    assert settings.cache_dir == "/var/cache/my"


def test_env_overrides_default_to_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MODELYARD_SERVER__PORT", "9123")
    assert decode_settings({}).server.port == 9123


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"MODELYARD_SERVER__PROT": "1"},
            "MODELYARD_SERVER__PROT: server.prot does not name a setting",
        ),
        ({"MODELYARD_FOO": "1"}, "MODELYARD_FOO: foo does not name a setting"),
        (
            {"MODELYARD_SERVER__PORT__X": "1"},
            "MODELYARD_SERVER__PORT__X: server.port.x does not name a setting",
        ),
    ],
)
def test_unknown_env_keys_are_errors_naming_the_variable(
    env: dict[str, str], expected: str
) -> None:
    assert _config_error({}, env) == expected


def test_an_env_value_of_the_wrong_type_names_the_path() -> None:
    detail = _config_error({}, {"MODELYARD_SERVER__PORT": "nine"})
    assert detail == "$.server.port: Expected `int`, got `str`"


# -- resolving models against backends ----------------------------------------------------


def test_unknown_backend_lists_the_installed_ones(plugin_host: PluginHost) -> None:
    detail = _resolve_error(plugin_host, {"models": [_model("a"), _model("b", backend="onx")]})
    assert detail == (
        "$.models[1].backend: unknown backend 'onx'; "
        "installed: counting, echo, failing, hanging, slow, stuck"
    )


def test_backend_option_errors_are_rerooted_at_the_model(plugin_host: PluginHost) -> None:
    wrong_type = _resolve_error(plugin_host, {"models": [_model(options={"dim": "wide"})]})
    assert wrong_type == "$.models[0].options.dim: Expected `int`, got `str`"

    unknown = _resolve_error(plugin_host, {"models": [_model(), _model("n", options={"dims": 3})]})
    assert unknown == "$.models[1].options: unknown field `dims`"

    too_big = _resolve_error(plugin_host, {"models": [_model(options={"dim": 10**6})]})
    assert too_big == "$.models[0].options.dim: Expected `int` <= 4096"


def test_duplicate_versions_are_an_error(plugin_host: PluginHost) -> None:
    detail = _resolve_error(plugin_host, {"models": [_model(version="1"), _model(version="1")]})
    assert detail == "$.models[1].version: 'm' version '1' listed twice"


def test_two_active_versions_are_an_error(plugin_host: PluginHost) -> None:
    models = [_model(version="1", active=True), _model("other"), _model(version="2", active=True)]
    detail = _resolve_error(plugin_host, {"models": models})
    assert detail == "$.models[2].active: 'm' already has an active version ($.models[0])"


def test_a_task_the_backend_cannot_serve_is_an_error() -> None:
    settings = decode_settings(
        {"models": [{"name": "e", "backend": "embed-only", "source": ".", "task": "chat"}]}, env={}
    )
    with pytest.raises(ConfigError) as caught:
        resolve_models(settings, {"embed-only": EmbedOnly})
    assert caught.value.detail == (
        "$.models[0].task: backend 'embed-only' cannot serve 'chat'; it serves: embeddings"
    )


def test_the_version_marked_active_serves(plugin_host: PluginHost) -> None:
    settings = decode_settings(
        {"models": [_model(version="1"), _model(version="2", active=True), _model(version="3")]},
        env={},
    )
    specs = resolve_models(settings, plugin_host.backends)
    assert [(s.version, s.active) for s in specs] == [("1", False), ("2", True), ("3", False)]


def test_the_first_listed_version_is_active_by_default(plugin_host: PluginHost) -> None:
    settings = decode_settings(
        {"models": [_model("a", version="b1"), _model("z"), _model("a", version="b2")]}, env={}
    )
    specs = resolve_models(settings, plugin_host.backends)
    assert [(s.name, s.version, s.active) for s in specs] == [
        ("a", "b1", True), ("z", "1", True), ("a", "b2", False),
    ]


def test_settings_round_trip_through_msgspec() -> None:
    settings = load_settings(EXAMPLE, env={})
    again = msgspec.convert(msgspec.to_builtins(settings), Settings)
    assert again == settings


def test_relative_sources_resolve_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = tmp_path / "deploy" / "modelyard.toml"
    conf.parent.mkdir()
    conf.write_text(
        '[[models]]\nname = "a"\nbackend = "echo"\nsource = "models/a.onnx"\n'
        '[[models]]\nname = "b"\nbackend = "echo"\nsource = "file:b.gguf"\n'
        '[[models]]\nname = "c"\nbackend = "echo"\nsource = "pypi:pkg/c.gguf"\n'
        '[[models]]\nname = "d"\nbackend = "echo"\nsource = "/abs/d.gguf"\n'
    )
    monkeypatch.chdir(tmp_path)  # not the config's directory
    sources = [m.source for m in load_settings(conf, env={}).models]
    assert sources == [
        str(conf.parent / "models" / "a.onnx"), str(conf.parent / "b.gguf"), "pypi:pkg/c.gguf",
        "/abs/d.gguf",
    ]
