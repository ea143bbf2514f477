"""docs/cache.md stays true: its tier-plugin example runs, through the hook, as documented."""

from __future__ import annotations

import importlib
import importlib.machinery
import re
import sys
import tomllib
import types
from collections.abc import Iterator
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


class FakeMemcache:
    """Just the aiomcache surface the example uses, in a dict shared per server."""

    servers: ClassVar[dict[tuple[str, int], dict[bytes, bytes]]] = {}

    def __init__(self, host: str, port: int = 11211) -> None:
        self.data = self.servers.setdefault((host, port), {})
        self.exptimes: dict[bytes, int] = {}

    @staticmethod
    def _check(key: bytes) -> None:
        # aiomcache's own rule: bytes, 1-250 characters, no whitespace or control characters.
        assert isinstance(key, bytes) and re.fullmatch(rb"[^\s\x00-\x1f\x7f]{1,250}", key), key

    async def get(self, key: bytes) -> bytes | None:
        self._check(key)
        return self.data.get(key)

    async def set(self, key: bytes, value: bytes, exptime: int = 0) -> bool:
        self._check(key)
        assert isinstance(value, bytes)
        self.data[key] = value
        self.exptimes[key] = exptime
        return True

    async def delete(self, key: bytes) -> bool:
        self._check(key)
        return self.data.pop(key, None) is not None

    async def flush_all(self) -> None:
        self.data.clear()

    async def close(self) -> None:
        pass


@pytest.fixture
def memcached_plugin(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[types.ModuleType]:
    """The doc's plugin module, importing a stand-in ``aiomcache``."""
    FakeMemcache.servers = {}
    fake = types.ModuleType("aiomcache")
    fake.__spec__ = importlib.machinery.ModuleSpec("aiomcache", None)
    fake.Client = FakeMemcache  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "aiomcache", fake)
    (source,) = [b for b in _blocks("python") if "class MemcachedTier" in b]
    site = tmp_path / "site"
    site.mkdir()
    (site / "modelyard_memcached.py").write_text(source)
    monkeypatch.syspath_prepend(str(site))
    try:
        yield importlib.import_module("modelyard_memcached")
    finally:
        sys.modules.pop("modelyard_memcached", None)


async def test_the_memcached_example_plugs_in_and_caches(
    memcached_plugin: types.ModuleType, tmp_path: Path
) -> None:
    host = PluginHost(allow=())
    assert host.register(cache_plugin, name="cache")
    assert host.register(memcached_plugin, name="memcached")
    assert set(host.cache_tiers) == {"memory", "disk", "redis", "memcached"}
    toml = next(b for b in _blocks("toml") if 'tier = "memcached"' in b)
    settings = msgspec.convert({"enabled": True, **tomllib.loads(toml)["cache"]}, CacheSettings)
    layer = build_cache_layer(settings, host.cache_tiers, server_cache_dir=tmp_path)
    assert layer is not None
    memory, memcached = layer.tiers
    request = CompletionRequest("via memcached", GenerationParams(temperature=0))
    key = layer.key_for(request, model="m", version="1", weights_digest="w", backend="echo",
                        backend_version="1", tenant="")
    assert key is not None

    async def run() -> GenerationResult:
        return GenerationResult("from the backend", "stop", 2, 3)

    assert (await layer.lookup_or_run(key, run))[1] == "miss"
    await layer.settle()
    server = FakeMemcache.servers[("cache.internal", 11211)]
    stored = b"modelyard:" + key.hex().encode()
    assert list(server) == [stored]
    assert memcached._client.exptimes[stored] == 86400  # type: ignore[attr-defined]
    await memory.clear()
    assert (await layer.lookup_or_run(key, run))[1] == "hit"  # from memcached, promoted
    await layer.purge(None)
    assert server == {}
    await layer.close()


def test_the_memcached_example_is_skipped_without_its_client(
    memcached_plugin: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memcached_plugin.importlib.util, "find_spec", lambda name, *a: None)
    host = PluginHost(allow=())
    assert not host.register(memcached_plugin, name="memcached")
    assert host.records[0].status == "skipped"
    assert host.records[0].error == "pip install aiomcache"


def test_the_documented_config_decodes(tmp_path: Path) -> None:
    toml = next(b for b in _blocks("toml") if "[cache]" in b)
    settings = msgspec.convert(tomllib.loads(toml)["cache"], CacheSettings)
    assert [t.tier for t in settings.tiers] == ["memory", "disk"]
    assert settings.tiers[1].dedup


def test_the_documented_options_match_the_option_types() -> None:
    from modelyard.cache.disk import DiskOptions
    from modelyard.cache.memory import MemoryOptions
    from modelyard.cache.redis import RedisOptions

    text = DOC.read_text()
    for options in (MemoryOptions, DiskOptions, RedisOptions):
        for name in options.__struct_fields__:
            assert f"`{name}`" in text, (options.__name__, name)
