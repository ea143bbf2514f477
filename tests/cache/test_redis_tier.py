"""The ``redis`` tier on a real Redis/Valkey: shared answers and purges, bytes only, TTLs,
outages that degrade to misses and recover on their own."""

from __future__ import annotations

import asyncio
import logging
import pickle
import re
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis
import zstandard

from _services import RedisServer
from modelyard.api.app import create_app
from modelyard.cache import plugin as cache_plugin
from modelyard.cache.codec import ResultCodec
from modelyard.cache.config import CacheSettings
from modelyard.cache.factory import build_cache_layer
from modelyard.cache.keys import derive_secrets
from modelyard.cache.layer import CacheLayer
from modelyard.cache.memory import MemoryOptions, MemoryTier
from modelyard.cache.redis import RedisGenerations, RedisOptions, RedisTier
from modelyard.core.cache_tier import CacheTier
from modelyard.core.errors import ConfigError, ServiceUnavailableError
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.core.types import CompletionRequest, GenerationParams, GenerationResult
from modelyard.testing import CacheTierConformance, FakeClock

SECRET = "shared by every server"
GREEDY = GenerationParams(temperature=0.0, max_tokens=8)


def _prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


class TestRedisTierConformance(CacheTierConformance):
    """The kit's checks against a real server; its TTL runs on the server's clock (below)."""

    tier = RedisTier
    entry_point = "cache"
    options = {"url": "redis://127.0.0.1:6379/0"}

    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str) -> None:
        self.url = redis_url

    def make_tier(self, *, clock: FakeClock, directory: Path) -> CacheTier:
        return RedisTier(RedisOptions(url=self.url, prefix=_prefix(), timeout_s=5), clock=clock)


def _tier(url: str, prefix: str, clock: FakeClock | None = None, **options: Any) -> RedisTier:
    # A generous timeout: on a loaded test machine a slow answer must not read as an outage.
    options.setdefault("timeout_s", 5)
    return RedisTier(RedisOptions(url=url, prefix=prefix, **options), clock=clock or FakeClock())


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class Server:
    """One modelyard server's cache: a memory tier in front of the shared redis tier."""

    def __init__(self, url: str, prefix: str, clock: FakeClock | None = None,
                 **options: Any) -> None:
        self.memory = MemoryTier(MemoryOptions())
        self.redis = _tier(url, prefix, clock, **options)
        self.layer = CacheLayer([self.memory, self.redis], secret=SECRET,
                                generations=self.redis.purge_generations())
        self.runs = 0

    def key(self, text: str = "shared question", model: str = "m") -> bytes:
        key = self.layer.key_for(
            CompletionRequest(text, GREEDY), model=model, version="1", weights_digest="w",
            backend="echo", backend_version="1", tenant="acme",
        )
        assert key is not None
        return key

    async def ask(self, key: bytes) -> str:
        async def run() -> GenerationResult:
            self.runs += 1
            return GenerationResult(f"answer {self.runs}", "stop", 1, 1)

        _, outcome = await self.layer.lookup_or_run(key, run)
        await self.layer.settle()  # stored before the next step looks
        return outcome

    async def fresh_key(self, text: str = "shared question", model: str = "m") -> bytes:
        """A key built from the index as it is now (what a request does after any lookup)."""
        await self.layer.lookup(self.key(text, model))
        return self.key(text, model)


@pytest.fixture
async def servers(redis_url: str) -> AsyncIterator[Callable[..., Server]]:
    made: list[Server] = []
    prefix = _prefix()

    def make(**options: Any) -> Server:
        made.append(Server(redis_url, prefix, **options))
        return made[-1]

    yield make
    for server in made:
        await server.layer.close()


# -- what is stored -------------------------------------------------------------------------


async def test_values_are_the_layers_bytes_in_a_zstd_frame_never_pickled(
    raw: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle was used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, refuse)
    prefix = _prefix()
    tier = _tier(redis_url, prefix, ttl_s=120)
    layer = CacheLayer([tier], secret=SECRET, generations=tier.purge_generations())
    key = layer.key_for(CompletionRequest("stored how", GREEDY), model="m", version="1",
                        weights_digest="w", backend="echo", backend_version="1", tenant="")
    assert key is not None
    await layer.lookup(key)  # reads the purge index: later keys carry its stamp
    key = layer.key_for(CompletionRequest("stored how", GREEDY), model="m", version="1",
                        weights_digest="w", backend="echo", backend_version="1", tenant="")
    assert key is not None
    result = GenerationResult("bytes only", "stop", 2, 3)
    await layer.store(key, result)
    stored_key = prefix.encode() + key[:32]  # the tier sees the 32-byte key, as every tier does
    stored = raw.get(stored_key)
    assert isinstance(stored, bytes)
    codec = ResultCodec(derive_secrets(SECRET)[1])
    assert zstandard.decompress(stored) == codec.encode(result)
    assert 0 < raw.pttl(stored_key) <= 120_000
    assert await layer.lookup(key) == result
    await layer.close()


async def test_ttl_zero_keeps_entries_until_the_server_evicts_them(
    raw: redis.Redis, redis_url: str
) -> None:
    prefix = _prefix()
    tier = _tier(redis_url, prefix, ttl_s=0)
    await tier.set(b"k" * 32, b"forever")
    assert raw.pttl(prefix.encode() + b"k" * 32) == -1  # no expiry
    assert await tier.get(b"k" * 32) == b"forever"
    await tier.close()


async def test_a_value_this_tier_did_not_write_is_a_miss_and_removed(
    raw: redis.Redis, redis_url: str
) -> None:
    prefix = _prefix()
    tier = _tier(redis_url, prefix)
    planted = prefix.encode() + b"p" * 32
    raw.set(planted, pickle.dumps({"not": "ours"}))
    assert await tier.get(b"p" * 32) is None
    assert raw.exists(planted) == 0
    # A frame declaring a huge size is refused before anything is unpacked.
    raw.set(planted, zstandard.ZstdCompressor().compress(b"\0" * (1 << 20))[:4] + b"\xff" * 16)
    assert await tier.get(b"p" * 32) is None
    assert tier.stats()["corrupt"] == 2
    await tier.close()


def test_options_take_valkey_urls_and_name_a_wrong_one(tmp_path: Path, redis_url: str) -> None:
    host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
    options = msgspec.convert({"url": f"valkey://{host}:{port}/0"}, RedisOptions)
    assert options.url.startswith("valkey://")
    settings = msgspec.convert(
        {"enabled": True, "tiers": [{"tier": "redis", "options": {"url": "http://cache:80"}}]},
        CacheSettings,
    )
    with pytest.raises(ConfigError) as caught:
        build_cache_layer(settings, {"redis": RedisTier}, server_cache_dir=tmp_path)
    assert caught.value.detail.startswith("$.cache.tiers[0].options: invalid url")
    assert "valkey://" in caught.value.detail


def test_the_tier_is_registered_without_its_client_and_needs_it_only_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)  # not installed
    host = PluginHost(allow=())
    assert host.register(cache_plugin, name="cache")
    assert host.cache_tiers["redis"] is RedisTier
    memory_only = msgspec.convert({"enabled": True}, CacheSettings)
    assert build_cache_layer(memory_only, host.cache_tiers, server_cache_dir=tmp_path)
    with_redis = msgspec.convert(
        {"enabled": True, "tiers": [{"tier": "redis", "options": {"url": "redis://c:6379"}}]},
        CacheSettings,
    )
    with pytest.raises(ConfigError, match=r"modelyard\[redis\]"):
        build_cache_layer(with_redis, host.cache_tiers, server_cache_dir=tmp_path)


def test_the_documented_redis_config_decodes_and_every_option_is_documented() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "cache.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", doc, flags=re.DOTALL)
    toml = next(b for b in blocks if 'tier = "redis"' in b)
    settings = msgspec.convert(tomllib.loads(toml)["cache"], CacheSettings)
    (spec,) = [t for t in settings.tiers if t.tier == "redis"]
    options = msgspec.convert(spec.options, RedisOptions)
    assert options.url == "redis://cache.internal:6379/2" and options.ttl_s == 86400
    assert settings.secret  # the example shares its secret
    for name in RedisOptions.__struct_fields__:
        assert f"| `{name}` |" in doc, name


async def test_a_valkey_url_reaches_the_server(redis_url: str) -> None:
    tier = _tier(redis_url.replace("redis://", "valkey://"), _prefix())
    await tier.set(b"v" * 32, b"via valkey://")
    assert await tier.get(b"v" * 32) == b"via valkey://"
    await tier.close()


async def test_the_factory_shares_the_purge_index_through_the_tier(
    tmp_path: Path, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    tiers = [{"tier": "memory"}, {"tier": "redis", "options": {"url": redis_url}, "dedup": True}]
    with caplog.at_level(logging.WARNING, logger="modelyard.cache.factory"):
        layer = build_cache_layer(
            msgspec.convert({"enabled": True, "tiers": tiers}, CacheSettings),
            {"memory": MemoryTier, "redis": RedisTier}, server_cache_dir=tmp_path,
        )
    assert layer is not None
    assert isinstance(layer._generations, RedisGenerations)
    assert not (tmp_path / "responses" / "generations.json").exists()
    assert "same secret" in caplog.text  # generated secrets never share an entry
    await layer.close()


# -- shared between servers -----------------------------------------------------------------


async def test_an_answer_computed_on_one_server_is_a_hit_on_another(
    servers: Callable[..., Server],
) -> None:
    a, b = servers(), servers()
    await a.ask(a.key())  # the first lookup of each server reads the purge index
    await b.ask(b.key())
    key_a, key_b = a.key("only asked on a"), b.key("only asked on a")
    assert key_a == key_b
    assert await a.ask(key_a) == "miss"
    assert await b.ask(key_b) == "hit"
    assert b.runs == 1  # only its own first question ran
    assert b.layer.stats()["tiers"][1]["hits"] == 1  # from redis, promoted into memory


async def test_a_purge_on_one_server_is_seen_by_anothers_next_lookup(
    servers: Callable[..., Server],
) -> None:
    a, b = servers(), servers()
    key_a, key_b = await a.fresh_key(), await b.fresh_key()
    other = await b.fresh_key(model="other")
    assert await a.ask(key_a) == "miss"
    assert await b.ask(key_b) == "hit"  # now also in b's own memory tier
    assert await b.ask(other) == "miss"
    await a.layer.purge("m")
    # b's memory tier still holds the answer under the key b built before the purge. Another
    # lookup on b reads the new index first; the old key is still not served: its stamp is
    # checked against the index, not against b's copy of it.
    await b.layer.lookup(other)
    assert await b.ask(key_b) == "miss"
    assert b.key() != key_b and b.key() == a.key()
    assert await b.ask(b.key()) == "miss"  # the purged model starts over ...
    assert await a.ask(a.key()) == "hit"  # ... and is shared again
    assert await b.ask(b.key(model="other")) == "hit"  # another model's entries are kept


async def test_purging_everything_clears_the_prefix_and_nothing_else(
    servers: Callable[..., Server], raw: redis.Redis
) -> None:
    a = servers()
    key = await a.fresh_key()
    await a.ask(key)
    raw.set(b"someone-else", b"untouched")
    prefix = a.redis.options.prefix.encode()
    assert raw.exists(prefix + key[:32]) == 1
    await a.layer.purge(None)
    assert raw.exists(prefix + key[:32]) == 0
    assert raw.exists(prefix + b"generations") == 1  # the index stays
    assert raw.get(b"someone-else") == b"untouched"
    raw.delete(b"someone-else")


# -- outages --------------------------------------------------------------------------------


async def test_an_outage_is_a_miss_and_a_skipped_write_then_recovers(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    tier = _tier(redis_server.url, _prefix(), clock, retry_s=5)
    await tier.set(b"a" * 32, b"before")
    redis_server.stop()
    assert await tier.get(b"a" * 32) is None
    await tier.set(b"b" * 32, b"lost")  # no error: the answer is good without a copy
    await tier.delete(b"a" * 32)
    await tier.clear()
    stats = tier.stats()
    assert stats["available"] is False
    assert stats["store_errors"] == {"get": 1, "set": 1, "delete": 1, "clear": 1}
    redis_server.start()  # a fresh server: what it held is gone
    assert await tier.get(b"a" * 32) is None  # still backing off: not even tried
    assert tier.stats()["available"] is False and tier.stats()["store_errors"]["get"] == 2
    clock.advance(5)
    await tier.set(b"a" * 32, b"after")
    assert await tier.get(b"a" * 32) == b"after"
    assert tier.stats()["available"] is True
    await tier.close()


async def test_an_unreachable_index_means_misses_and_a_refused_purge(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    b = Server(redis_server.url, _prefix(), clock, retry_s=1)
    try:
        key = await b.fresh_key()
        assert await b.ask(key) == "miss"
        assert await b.ask(key) == "hit"
        redis_server.stop()
        # The answer is in b's memory tier, but a purge elsewhere cannot be ruled out.
        assert await b.ask(key) == "miss"
        assert b.layer.stats()["unverified"] >= 1
        with pytest.raises(ServiceUnavailableError):
            await b.layer.purge("m")
        redis_server.start()
        clock.advance(1)
        # The server came back empty: its index is new, so every earlier entry is a miss
        # (entries keyed under a lost index are never revived), then answers are shared again.
        assert await b.ask(key) == "miss"
        fresh = b.key()
        assert fresh != key
        assert await b.ask(fresh) == "miss"
        assert await b.ask(fresh) == "hit"
        assert b.redis.stats()["store_errors"]["generations"] >= 1
    finally:
        await b.layer.close()


# -- two apps over one Redis ----------------------------------------------------------------

CHAT = {"name": "m", "backend": "counting", "source": ".", "task": "chat"}


@pytest.fixture
def with_cache_tiers(plugin_host: PluginHost) -> Iterator[None]:
    plugin_host.register(cache_plugin, name="cache")
    try:
        yield
    finally:
        plugin_host.unregister("cache")


class App:
    def __init__(self, client: httpx.AsyncClient, service: InferenceService) -> None:
        self.client = client
        self.service = service

    async def chat(self, text: str) -> httpx.Response:
        body = {"model": "m", "messages": [{"role": "user", "content": text}],
                "temperature": 0}
        response = await self.client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert self.service.cache is not None
        await self.service.cache.settle()  # type: ignore[attr-defined]
        return response

    def calls(self) -> int:
        return len(self.service.registry.get("m").backend.calls)  # type: ignore[union-attr]


@pytest.fixture
async def two_apps(
    with_cache_tiers: None, plugin_host: PluginHost, make_settings: Callable[..., Settings],
    tmp_path: Path,
) -> AsyncIterator[Callable[[str], Any]]:
    async with AsyncExitStack() as stack:

        async def start(url: str) -> tuple[App, App]:
            apps = []
            for name in "ab":
                cache = {"enabled": True, "secret": SECRET, "directory": str(tmp_path / name),
                         "tiers": [{"tier": "memory"},
                                   {"tier": "redis",
                                    "options": {"url": url, "retry_s": 0, "timeout_s": 5}}]}
                settings = make_settings(models=[CHAT], cache=cache)
                service = InferenceService(settings, plugin_host)
                app = create_app(settings, plugins=plugin_host, service=service)
                await service.start()
                stack.push_async_callback(service.stop)
                await service.wait_until_loaded()
                client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                           base_url="http://testserver")
                await stack.enter_async_context(client)
                apps.append(App(client, service))
            return apps[0], apps[1]

        yield start


async def test_two_apps_share_answers_and_purges(
    two_apps: Callable[[str], Any], redis_server: RedisServer,
) -> None:
    a, b = await two_apps(redis_server.url)
    # Each server read the purge index when its cache opened: the very first answer of a is
    # shared, and the very first lookup of b can hit.
    assert (await a.chat("hello")).headers["x-cache"] == "MISS"
    hit = await b.chat("hello")
    assert hit.headers["x-cache"] == "HIT" and b.calls() == 0  # b never ran "hello"
    purged = await a.client.delete("/admin/cache", params={"model": "m"})
    assert purged.status_code == 200
    assert (await b.chat("hello")).headers["x-cache"] == "MISS"  # though in b's memory tier


async def test_a_store_outage_serves_misses_counts_them_and_recovers(
    two_apps: Callable[[str], Any], redis_server: RedisServer,
) -> None:
    a, b = await two_apps(redis_server.url)
    for app in (a, b):
        await app.chat("warm up")
    await a.chat("during")
    redis_server.stop()
    for app in (a, b):
        for _ in range(2):  # answered by the model, never a failed request
            assert (await app.chat("during")).headers["x-cache"] == "MISS"
    scrape = a.service.metrics_exposition()[0].decode()
    assert 'modelyard_shared_store_errors_total{operation="generations",store="redis"}' in scrape
    redis_server.start()
    # The server came back empty, with a new purge index: each app's first lookup re-reads it
    # (a miss), then answers are shared again.
    outcomes = [(await b.chat("after")).headers["x-cache"] for _ in range(3)]
    assert outcomes == ["MISS", "MISS", "HIT"]
    assert [(await a.chat("after")).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]


async def test_concurrent_lookups_during_an_outage_are_all_answered(
    redis_server: RedisServer,
) -> None:
    a = Server(redis_server.url, _prefix())
    try:
        keys = [await a.fresh_key(f"q{i}") for i in range(8)]
        redis_server.stop()
        outcomes = await asyncio.gather(*(a.ask(k) for k in keys))
        assert outcomes == ["miss"] * 8
    finally:
        await a.layer.close()
