"""Registration, options and execution providers."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelyard.backends import onnx as onnx_plugin
from modelyard.backends.onnx import providers as eps
from modelyard.backends.onnx.backend import OnnxBackend
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.backend import LoadContext
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import resolve_models
from modelyard.core.types import Task


def test_the_plugin_registers_the_onnx_backend(onnx_host: PluginHost) -> None:
    assert onnx_host.backends["onnx"] is OnnxBackend
    assert OnnxBackend.tasks >= {Task.TENSOR, Task.EMBEDDINGS, Task.CLASSIFICATION}


def test_without_the_runtime_the_plugin_is_skipped_not_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    host = PluginHost(allow=())
    assert not host.register(onnx_plugin, name="onnx")
    (record,) = host.records
    assert record.status == "skipped" and "modelyard[onnx]" in record.error


def test_options_are_strict_and_name_the_path(make_settings: Any, onnx_host: PluginHost) -> None:
    def resolve(options: dict[str, Any]) -> Any:
        settings = make_settings(
            models=[{"name": "m", "backend": "onnx", "source": ".", "options": options}]
        )
        return resolve_models(settings, onnx_host.backends)[0].options

    assert resolve({"providers": ["cuda", "CPU"]}).provider_list == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    with pytest.raises(ConfigError, match=r"\$\.models\[0\]\.options: unknown field `threads`"):
        resolve({"threads": 2})
    with pytest.raises(ConfigError, match="unknown execution provider 'Quantum'"):
        resolve({"providers": ["Quantum"]})
    with pytest.raises(ConfigError, match="graph_optimization"):
        resolve({"graph_optimization": "max"})
    with pytest.raises(ConfigError, match="file"):
        resolve({"file": "../model.onnx"})


def test_plan_keeps_order_skips_missing_and_ends_with_cpu() -> None:
    available = ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert eps.plan_providers(None, available) == (
        ["CoreMLExecutionProvider", "CPUExecutionProvider"],
        [],
    )
    plan, warnings = eps.plan_providers(["CUDAExecutionProvider"], available)
    assert plan == ["CPUExecutionProvider"]
    assert warnings == ["CUDAExecutionProvider is not available in this onnxruntime build"]


def test_a_provider_that_fails_to_initialise_gives_way_to_the_next() -> None:
    tried: list[list[str]] = []

    def open_session(providers: list[str]) -> str:
        tried.append(providers)
        if providers[0] == "CUDAExecutionProvider":
            raise RuntimeError("no CUDA device")
        return "session"

    plan = ["CUDAExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider"]
    session, warnings = eps.open_with_fallback(plan, open_session)
    assert session == "session"
    assert tried == [plan, plan[1:]]
    assert warnings == ["CUDAExecutionProvider failed to initialise (RuntimeError: no CUDA device)"]


async def test_unavailable_provider_falls_back_to_cpu_with_a_warning(
    tensor_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = msgspec.convert(
        {
            "providers": ["CUDA", "CPU"],
            "provider_options": {"CUDA": {"device_id": 0}},
            "intra_op_threads": 1,
            "graph_optimization": "basic",
        },
        OnnxOptions,
    )
    backend = OnnxBackend(
        LoadContext(
            model="m", version="1", task=Task.TENSOR, source="", path=tensor_model, options=options
        )
    )
    with caplog.at_level(logging.WARNING, logger="modelyard.backends.onnx"):
        await backend.load()
    parameters = backend.info().parameters
    assert parameters["providers"] == ["CPUExecutionProvider"]
    assert parameters["requested_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in w for w in parameters["provider_warnings"])
    assert any(
        "CUDAExecutionProvider" in r.getMessage() and "falling back" in r.getMessage()
        for r in caplog.records
    )


async def test_optimised_model_is_saved_where_asked(tensor_model: Path) -> None:
    options = OnnxOptions(optimized_model_path="optimized.onnx")
    backend = OnnxBackend(
        LoadContext(
            model="m",
            version="1",
            task=Task.TENSOR,
            source="",
            path=tensor_model.parent,
            options=options,
        )
    )
    await backend.load()
    assert (tensor_model.parent / "optimized.onnx").is_file()


def test_detect_task_without_a_tokenizer_is_tensor(tensor_model: Path) -> None:
    assert OnnxBackend.detect_task(tensor_model.parent, OnnxOptions()) == Task.TENSOR
