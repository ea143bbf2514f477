"""The response cache over HTTP: X-Cache, Cache-Control, streams, purge, stats."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.cache import plugin as cache_plugin
from modelyard.core.plugins import PluginHost

CHAT = {"name": "m", "backend": "counting", "source": ".", "task": "chat"}


@pytest.fixture(autouse=True)
def with_cache_tiers(plugin_host: PluginHost) -> Iterator[None]:
    plugin_host.register(cache_plugin, name="cache")
    try:
        yield
    finally:
        plugin_host.unregister("cache")


def _cache(tmp_path: Path) -> dict[str, Any]:
    return {"enabled": True, "directory": str(tmp_path / "c"),
            "tiers": [{"tier": "memory"}, {"tier": "disk", "dedup": True}]}


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "temperature": 0,
            **extra}


async def test_miss_then_hit_refresh_and_bypass(start_api: Any, tmp_path: Path) -> None:
    api = await start_api(CHAT, cache=_cache(tmp_path))
    backend = api.service.registry.get("m").backend
    r1 = await api.client.post("/v1/chat/completions", json=_chat("hello there"))
    r2 = await api.client.post("/v1/chat/completions", json=_chat("hello there"))
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert (r1.headers["x-cache"], r2.headers["x-cache"]) == ("MISS", "HIT")
    assert r1.json()["choices"] == r2.json()["choices"]
    assert len(backend.calls) == 1
    r3 = await api.client.post("/v1/chat/completions", json=_chat("hello there"),
                               headers={"Cache-Control": "no-cache"})
    assert (
        r3.headers["x-cache"] == "BYPASS" and len(backend.calls) == 2
    )  # read bypassed, entry refreshed
    await api.service.cache.settle()  # the refreshed answer is stored after it is sent
    r3b = await api.client.post("/v1/chat/completions", json=_chat("hello there"))
    assert r3b.headers["x-cache"] == "HIT" and len(backend.calls) == 2
    r4 = await api.client.post("/v1/chat/completions", json=_chat("hello there", temperature=0.7))
    assert r4.headers["x-cache"] == "BYPASS"
    r5 = await api.client.post(
        "/v1/chat/completions", json=_chat("hello there"), headers={"Cache-Control": "no-store"}
    )
    assert r5.headers["x-cache"] == "BYPASS"


async def test_completions_with_several_prompts(start_api: Any, tmp_path: Path) -> None:
    api = await start_api(CHAT, cache=_cache(tmp_path))
    body = {"model": "m", "prompt": ["one two", "three four"], "temperature": 0}
    first = await api.client.post("/v1/completions", json=body)
    again = await api.client.post("/v1/completions", json=body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    body["prompt"] = ["one two", "five"]
    assert (await api.client.post("/v1/completions", json=body)).headers["x-cache"] == "MISS"


async def test_a_stream_is_replayed(start_api: Any, tmp_path: Path) -> None:
    api = await start_api(CHAT, cache=_cache(tmp_path))
    body = _chat("stream me please", stream=True)
    r1 = await api.client.post("/v1/chat/completions", json=body)
    r2 = await api.client.post("/v1/chat/completions", json=body)
    assert (r1.headers["x-cache"], r2.headers["x-cache"]) == ("MISS", "HIT")
    assert r2.text.endswith("data: [DONE]\n\n") and "stream" in r2.text
    plain = await api.client.post("/v1/chat/completions", json=_chat("stream me please"))
    assert plain.headers["x-cache"] == "HIT"


async def test_purge_and_stats(start_api: Any, tmp_path: Path) -> None:
    api = await start_api(CHAT, cache=_cache(tmp_path))
    await api.client.post("/v1/chat/completions", json=_chat("purge"))
    await api.service.cache.settle()
    stats = (await api.client.get("/admin/cache")).json()
    assert stats["misses"] == 1 and stats["tiers"][1]["writes"] == 1
    r = await api.client.delete("/admin/cache", params={"model": "m"})
    assert r.status_code == 200 and r.json() == {"purged": "m"}
    again = await api.client.post("/v1/chat/completions", json=_chat("purge"))
    assert again.headers["x-cache"] == "MISS"
    assert (await api.client.delete("/admin/cache")).json() == {"purged": "all"}


async def test_a_disabled_cache_says_bypass(start_api: Any) -> None:
    api = await start_api(CHAT)
    r = await api.client.post("/v1/chat/completions", json=_chat("x"))
    assert r.headers["x-cache"] == "BYPASS"
    assert (await api.client.get("/admin/cache")).status_code == 409


async def test_embeddings_and_v2_tensors(start_api: Any, tmp_path: Path) -> None:
    api = await start_api(
        {"name": "e", "backend": "echo", "source": ".", "task": "embeddings"},
        {"name": "t", "backend": "echo", "source": ".", "task": "tensor"},
        cache=_cache(tmp_path),
    )
    emb = {"model": "e", "input": ["a b", "c"]}
    outs = [(await api.client.post("/v1/embeddings", json=emb)).headers["x-cache"] for _ in "12"]
    assert outs == ["MISS", "HIT"]
    tensor = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}
    answers = [await api.client.post("/v2/models/t/infer", json=tensor) for _ in "12"]
    assert [a.headers["x-cache"] for a in answers] == ["MISS", "HIT"]
    assert answers[0].json()["outputs"] == answers[1].json()["outputs"]


async def test_cache_tiers_show_in_metrics(start_api: Any, tmp_path: Path) -> None:
    api = await start_api(CHAT, cache=_cache(tmp_path))
    await api.client.post("/v1/chat/completions", json=_chat("one"))  # miss in both tiers
    await api.service.cache.settle()
    await api.client.post("/v1/chat/completions", json=_chat("one"))  # memory hit
    await api.service.cache.settle()
    text = (await api.client.get("/metrics")).text
    assert 'modelyard_cache_hits_total{tier="memory"} 1.0' in text
    assert 'modelyard_cache_misses_total{tier="memory"} 1.0' in text
    assert 'modelyard_cache_misses_total{tier="disk"} 1.0' in text
    assert 'modelyard_cache_bytes{tier="disk"}' in text
    assert 'modelyard_cache_dedup_ratio{tier="disk"}' in text
    # A second scrape adds nothing: the counters follow the layer, they do not double.
    again = (await api.client.get("/metrics")).text
    assert 'modelyard_cache_hits_total{tier="memory"} 1.0' in again
