"""Building the layer from ``[cache]``, the plugin hook, and the layer in front of the service."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from modelyard.cache import plugin as cache_plugin
from modelyard.cache.config import CacheSettings
from modelyard.cache.dedup import DedupTier
from modelyard.cache.disk import DiskTier
from modelyard.cache.factory import build_cache_layer
from modelyard.cache.memory import MemoryTier
from modelyard.cache.redis import RedisTier
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import CompletionRequest, GenerationParams, GenerationResult

TIERS = {"memory": MemoryTier, "disk": DiskTier}


def _settings(**raw: Any) -> CacheSettings:
    return msgspec.convert({"enabled": True, **raw}, CacheSettings)


def test_disabled_by_default(tmp_path: Path) -> None:
    assert build_cache_layer(CacheSettings(), TIERS, server_cache_dir=tmp_path) is None


async def test_builds_tiers_in_order_with_private_files(tmp_path: Path) -> None:
    settings = _settings(tiers=[
        {"tier": "memory", "options": {"max_bytes": 1 << 20, "ttl_s": 60}},
        {"tier": "disk", "options": {"max_bytes": 1 << 24}, "dedup": True},
    ])
    layer = build_cache_layer(settings, TIERS, server_cache_dir=tmp_path)
    assert layer is not None
    memory, dedup = layer.tiers
    assert isinstance(memory, MemoryTier) and isinstance(dedup, DedupTier)
    assert isinstance(dedup.inner, DiskTier)
    root = tmp_path / "responses"
    assert dedup.inner.directory == root / "disk"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "disk").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / "secret").stat().st_mode) == 0o600
    await layer.purge("m")
    assert stat.S_IMODE((root / "generations.json").stat().st_mode) == 0o600
    await layer.close()


async def test_a_configured_secret_is_used_and_no_file_is_written(tmp_path: Path) -> None:
    settings = _settings(secret="from-config", directory=str(tmp_path / "c"))
    layer = build_cache_layer(settings, TIERS, server_cache_dir=tmp_path / "unused")
    assert layer is not None
    assert not (tmp_path / "c" / "secret").exists()
    await layer.close()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"tiers": [{"tier": "redis"}]}, "$.cache.tiers[0].tier: unknown cache tier 'redis'"),
        ({"tiers": [{"tier": "memory", "options": {"max_bytes": "big"}}]},
         "$.cache.tiers[0].options.max_bytes: Expected `int`"),
        ({"tiers": [{"tier": "memory"}, {"tier": "disk", "options": {"ttl": 5}}]},
         "$.cache.tiers[1].options: unknown field `ttl`"),
        ({"tiers": []}, "$.cache.tiers: an enabled cache needs at least one tier"),
        ({"tiers": [{"tier": "disk"}, {"tier": "disk"}]}, "two tiers share the directory"),
    ],
)
def test_config_mistakes_name_their_path(tmp_path: Path, raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_cache_layer(_settings(**raw), TIERS, server_cache_dir=tmp_path)
    assert message in caught.value.detail


def test_the_plugin_registers_the_first_party_tiers() -> None:
    host = PluginHost(allow=())
    assert host.register(cache_plugin, name="cache")
    try:
        assert host.cache_tiers == {"memory": MemoryTier, "disk": DiskTier, "redis": RedisTier}
        assert host.records[0].cache_tiers == ["memory", "disk", "redis"]
    finally:
        host.unregister("cache")


def test_the_plugin_is_skipped_without_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = cache_plugin.importlib.util.find_spec
    monkeypatch.setattr(
        cache_plugin.importlib.util, "find_spec",
        lambda name, *a: None if name == "zstandard" else real(name, *a),
    )
    host = PluginHost(allow=())
    assert not host.register(cache_plugin, name="cache")
    record = host.records[0]
    assert record.status == "skipped" and "modelyard[cache]" in record.error
    assert "zstandard" in record.error


async def test_the_layer_in_front_of_the_service(
    tmp_path: Path, plugin_host: PluginHost, make_settings: Callable[..., Settings]
) -> None:
    """What the service integration does: pin the serving version, key on it, run through it."""
    settings = make_settings(models=[{"name": "echo", "backend": "counting", "source": ".",
                                     "task": "completion"}])
    service = InferenceService(settings, plugin_host)
    layer = build_cache_layer(_settings(), TIERS, server_cache_dir=tmp_path)
    assert layer is not None
    await service.start()
    try:
        await service.wait_until_loaded()
        version = service.registry.get("echo", None)
        assert version.backend is not None
        request = CompletionRequest("cached through the service", GenerationParams(temperature=0))
        key = layer.key_for(
            request, model=version.name, version=version.version, weights_digest="w",
            backend=version.spec.backend.name, backend_version="0", tenant="",
        )
        assert key is not None

        async def run() -> Any:
            return (await service.infer("echo", request, version=version.version)).result

        outcomes = [(await layer.lookup_or_run(key, run))[1] for _ in range(3)]
        assert outcomes == ["miss", "hit", "hit"]
        assert version.backend.calls == [1]  # type: ignore[attr-defined]
        result = await layer.lookup(key)
        assert isinstance(result, GenerationResult) and result.text == "cached through the service"
    finally:
        await service.stop()
        await layer.close()


async def test_an_injected_clock_drives_every_tier_ttl(tmp_path: Path, fake_clock: Any) -> None:
    settings = _settings(tiers=[
        {"tier": "memory", "options": {"ttl_s": 10}},
        {"tier": "disk", "options": {"ttl_s": 100}},
    ])
    layer = build_cache_layer(settings, TIERS, server_cache_dir=tmp_path, clock=fake_clock)
    assert layer is not None
    request = CompletionRequest("ttl through config", GenerationParams(temperature=0))
    key = layer.key_for(request, model="m", version="1", weights_digest="w", backend="b",
                        backend_version="1", tenant="")
    assert key is not None
    runs = 0

    async def run() -> GenerationResult:
        nonlocal runs
        runs += 1
        return GenerationResult("x", "stop", 1, 1)

    await layer.lookup_or_run(key, run)
    await layer.settle()  # the store runs after the answer is handed out
    fake_clock.advance(50)  # memory expired, disk not: a disk hit, promoted
    assert (await layer.lookup_or_run(key, run))[1] == "hit"
    assert [t["hits"] for t in layer.stats()["tiers"]] == [0, 1]
    await layer.settle()
    fake_clock.advance(100)
    assert (await layer.lookup_or_run(key, run))[1] == "miss"
    assert runs == 2
    await layer.close()
