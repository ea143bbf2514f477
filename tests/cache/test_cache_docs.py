"""docs/cache.md stays true: its Redis tier example runs, through the hook, as documented."""

from __future__ import annotations

import fnmatch
import importlib
import importlib.machinery
import re
import sys
import tomllib
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import ClassVar

import msgspec
import pytest

from modelyard.cache import plugin as cache_plugin
from modelyard.cache.config import CacheSettings
from modelyard.cache.factory import build_cache_layer
from modelyard.core.plugins import PluginHost
from modelyard.core.types import CompletionRequest, GenerationParams, GenerationResult

DOC = Path(__file__).resolve().parents[2] / "docs" / "cache.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


class FakeRedis:
    """Just the redis.asyncio surface the example uses, in a dict shared per URL."""

    servers: ClassVar[dict[str, dict[bytes, bytes]]] = {}

    def __init__(self, url: str) -> None:
        self.data = self.servers.setdefault(url, {})
        self.ttls: dict[bytes, int | None] = {}

    @classmethod
    def from_url(cls, url: str) -> FakeRedis:
        return cls(url)

    async def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: bytes, value: bytes, ex: int | None = None) -> None:
        self.data[key] = value
        self.ttls[key] = ex

    async def delete(self, key: bytes) -> None:
        self.data.pop(key, None)

    async def scan_iter(self, match: bytes) -> AsyncIterator[bytes]:
        pattern = match.decode("latin-1")
        for key in list(self.data):
            if fnmatch.fnmatchcase(key.decode("latin-1"), pattern):
                yield key

    async def aclose(self) -> None:
        pass


@pytest.fixture
def redis_plugin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[types.ModuleType]:
    """The doc's plugin module, importing a stand-in ``redis.asyncio``."""
    FakeRedis.servers = {}
    fake_redis = types.ModuleType("redis")
    fake_redis.__spec__ = importlib.machinery.ModuleSpec("redis", None)
    fake_asyncio = types.ModuleType("redis.asyncio")
    fake_asyncio.Redis = FakeRedis  # type: ignore[attr-defined]
    fake_redis.asyncio = fake_asyncio  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "redis", fake_redis)
    monkeypatch.setitem(sys.modules, "redis.asyncio", fake_asyncio)
    (source,) = [b for b in _blocks("python") if "class RedisTier" in b]
    site = tmp_path / "site"
    site.mkdir()
    (site / "modelyard_redis.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    try:
        yield importlib.import_module("modelyard_redis")
    finally:
        sys.modules.pop("modelyard_redis", None)


async def test_the_redis_example_plugs_in_and_caches(
    redis_plugin: types.ModuleType, tmp_path: Path
) -> None:
    host = PluginHost(allow=())
    assert host.register(cache_plugin, name="cache")
    assert host.register(redis_plugin, name="redis")
    assert set(host.cache_tiers) == {"memory", "disk", "redis"}
    toml = next(b for b in _blocks("toml") if 'tier = "redis"' in b)
    settings = msgspec.convert({"enabled": True, **tomllib.loads(toml)["cache"]}, CacheSettings)
    layer = build_cache_layer(settings, host.cache_tiers, server_cache_dir=tmp_path)
    assert layer is not None
    memory, redis_tier = layer.tiers
    request = CompletionRequest("via redis", GenerationParams(temperature=0))
    key = layer.key_for(request, model="m", version="1", weights_digest="w", backend="echo",
                        backend_version="1", tenant="")
    assert key is not None

    async def run() -> GenerationResult:
        return GenerationResult("from the backend", "stop", 2, 3)

    assert (await layer.lookup_or_run(key, run))[1] == "miss"
    server = FakeRedis.servers["redis://cache.internal:6379/2"]
    assert list(server) == [b"modelyard:" + key]
    assert redis_tier._redis.ttls[b"modelyard:" + key] == 86400
    await memory.clear()
    assert (await layer.lookup_or_run(key, run))[1] == "hit"  # from redis, promoted
    server[b"someone-else"] = b"untouched"
    await layer.purge(None)
    assert list(server) == [b"someone-else"]
    await layer.close()


def test_the_redis_example_is_skipped_without_redis(
    redis_plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_plugin.importlib.util, "find_spec", lambda name, *a: None)
    host = PluginHost(allow=())
    assert not host.register(redis_plugin, name="redis")
    assert host.records[0].status == "skipped"
    assert host.records[0].error == "pip install redis"


def test_the_documented_config_decodes(tmp_path: Path) -> None:
    toml = next(b for b in _blocks("toml") if "[cache]" in b)
    settings = msgspec.convert(tomllib.loads(toml)["cache"], CacheSettings)
    assert [t.tier for t in settings.tiers] == ["memory", "disk"]
    assert settings.tiers[1].dedup


def test_the_documented_options_match_the_option_types() -> None:
    from modelyard.cache.disk import DiskOptions
    from modelyard.cache.memory import MemoryOptions

    text = DOC.read_text()
    for options in (MemoryOptions, DiskOptions):
        for name in options.__struct_fields__:
            assert f"`{name}`" in text, (options.__name__, name)
