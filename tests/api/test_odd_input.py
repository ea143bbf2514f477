"""Odd but well-formed input found by fuzzing the API: a clear 4xx or a right answer, never 500.

Each case was a 500 before its fix. Integers past 64 bits broke the response cache's keys
(msgpack holds 64-bit integers); a tensor output past FP32's range broke the binary tensor
encoder. The bounds now sit on the wire Structs (and on ``GenerationParams`` for the v2
``parameters``), so the OpenAPI schema states them too.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.cache import plugin as cache_plugin
from modelyard.core.plugins import PluginHost

HUGE = 2**70
MODELS = [
    {"name": "echo", "backend": "echo", "source": ".", "task": "chat"},
    {"name": "labels", "backend": "echo", "source": ".", "task": "classification"},
    {"name": "doubler", "backend": "echo", "source": ".", "task": "tensor"},
]


@pytest.fixture(autouse=True)
def with_cache_tiers(plugin_host: PluginHost) -> Iterator[None]:
    plugin_host.register(cache_plugin, name="cache")
    try:
        yield
    finally:
        plugin_host.unregister("cache")


async def _api(start_api: Any, tmp_path: Path) -> Any:
    return await start_api(*MODELS, cache={"enabled": True, "directory": str(tmp_path / "c")})


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
            **extra}


@pytest.mark.parametrize("extra", [
    {"seed": HUGE}, {"seed": -HUGE}, {"max_tokens": HUGE}, {"top_k": HUGE},
    {"max_completion_tokens": HUGE}, {"logit_bias": {str(HUGE): 1.0}},
], ids=["seed", "negative seed", "max_tokens", "top_k", "max_completion_tokens", "logit_bias"])
async def test_integers_past_64_bits_are_refused_not_a_500(
    start_api: Any, tmp_path: Path, problem: Any, extra: dict[str, Any]
) -> None:
    api = await _api(start_api, tmp_path)
    body = problem(await api.client.post("/v1/chat/completions", json=_chat(**extra)), 400)
    assert list(extra)[0] in body["detail"]


async def test_v2_sampling_parameters_past_64_bits_are_refused(
    start_api: Any, tmp_path: Path, problem: Any
) -> None:
    api = await _api(start_api, tmp_path)
    body = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1],
                        "data": ["hi"]}],
            "parameters": {"seed": HUGE, "temperature": 0}}
    refused = problem(await api.client.post("/v2/models/echo/infer", json=body), 400)
    assert "seed" in refused["detail"]


async def test_classify_top_k_past_64_bits_is_refused(
    start_api: Any, tmp_path: Path, problem: Any
) -> None:
    api = await _api(start_api, tmp_path)
    body = {"model": "labels", "input": "hi", "top_k": HUGE}
    problem(await api.client.post("/v1/classify", json=body), 400)


async def test_a_binary_fp32_output_past_its_range_is_infinity(
    start_api: Any, tmp_path: Path
) -> None:
    api = await _api(start_api, tmp_path)
    largest = 3.4e38  # an FP32; the doubler's answer is past FP32's range
    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2],
                        "data": [largest, -largest]}],
            "parameters": {"binary_data_output": True}}
    response = await api.client.post("/v2/models/doubler/infer", json=body)
    assert response.status_code == 200, response.text
    header = int(response.headers["inference-header-content-length"])
    assert struct.unpack("<2f", response.content[header:]) == (math.inf, -math.inf)
