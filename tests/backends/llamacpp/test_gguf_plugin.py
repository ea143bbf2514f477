"""The ``gguf`` plugin: registration, its skip without the runtime, and option validation."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from modelyard.backends import llamacpp
from modelyard.backends.llamacpp.backend import GGUFBackend
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings, resolve_models
from modelyard.core.types import Task


def test_the_plugin_registers_the_gguf_backend() -> None:
    host = PluginHost(allow=())
    assert host.register(llamacpp, name="gguf", source="modelyard")
    assert host.backends["gguf"] is GGUFBackend
    assert GGUFBackend.tasks == {Task.CHAT, Task.COMPLETION, Task.EMBEDDINGS}
    (record,) = host.records
    assert (record.status, record.backends) == ("loaded", ["gguf"])


def test_without_llama_cpp_python_the_plugin_is_skipped_with_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real(name, *a),
    )
    host = PluginHost(allow=())
    assert not host.register(llamacpp, name="gguf", source="modelyard")
    (record,) = host.records
    assert record.status == "skipped"
    assert record.error == "missing llama-cpp-python: pip install 'modelyard[gguf]'"
    assert "gguf" not in host.backends


def _resolve(options: dict[str, Any]) -> Any:
    settings = decode_settings({"models": [{
        "name": "m", "backend": "gguf", "source": "m.gguf", "options": options,
    }]}, env={})
    (spec,) = resolve_models(settings, {"gguf": GGUFBackend})
    return spec.options


def test_options_have_working_defaults_and_accept_offload_spellings() -> None:
    defaults = _resolve({})
    assert (defaults.n_gpu_layers, defaults.parallel, defaults.max_queue) == ("auto", 4, 64)
    assert _resolve({"n_gpu_layers": "all"}).n_gpu_layers == "all"
    assert _resolve({"n_gpu_layers": 12, "parallel": 8}).n_gpu_layers == 12


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"paralel": 8}, "$.models[0].options: unknown field `paralel`"),
        ({"n_gpu_layers": "most"}, "$.models[0].options.n_gpu_layers"),
        ({"n_gpu_layers": -2}, "$.models[0].options.n_gpu_layers"),
        ({"parallel": 0}, "$.models[0].options.parallel"),
        ({"chat_format": "vicuna-9"}, "$.models[0].options.chat_format"),
        ({"flash_attn": "maybe"}, "$.models[0].options.flash_attn"),
    ],
)
def test_a_bad_option_is_a_config_error_naming_its_path(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        _resolve(options)
    assert message in caught.value.detail
