"""Cluster-wide rate limits: token buckets in a real Redis/Valkey, shared by every server,
deciding exactly as the local buckets do, and falling back to them when the store is gone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
import redis

from _services import RedisServer
from modelyard.api.app import create_app
from modelyard.api.security import Security
from modelyard.cache.redis_limits import SharedRateLimiter
from modelyard.core.auth_settings import AuthSettings
from modelyard.core.errors import ConfigError
from modelyard.core.plugins import PluginHost
from modelyard.core.ratelimit import RateLimit, RateLimiter, TokenBucket
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings
from modelyard.testing import FakeClock

WALL = 1_800_000_000.0


def _limiter(url: str, **kwargs: Any) -> SharedRateLimiter:
    # A generous timeout: on a loaded test machine a slow answer must not read as an outage.
    kwargs.setdefault("timeout_s", 5)
    kwargs.setdefault("prefix", f"test:{uuid.uuid4().hex}:")
    return SharedRateLimiter(url, **kwargs)


@pytest.fixture
async def limiters(redis_url: str) -> AsyncIterator[Callable[..., SharedRateLimiter]]:
    made: list[SharedRateLimiter] = []

    def make(**kwargs: Any) -> SharedRateLimiter:
        made.append(_limiter(redis_url, **kwargs))
        return made[-1]

    yield make
    for limiter in made:
        await limiter.aclose()


# -- the same decisions as the local bucket -------------------------------------------------


async def test_decisions_equal_the_local_buckets_to_the_float(
    limiters: Callable[..., SharedRateLimiter],
) -> None:
    clock = FakeClock(WALL)
    shared = limiters(now=clock)
    limit = RateLimit(rate=2, burst=3)
    local = TokenBucket(limit, now=clock())
    steps = [0, 0, 0, 0, 0.2, 0.3, 0.25, 1.0, 0, 0, 0, 10.0, 0, 0.01]
    for step in steps:
        clock.advance(step)
        assert await shared.charge("k", limit) == local.take(clock())


async def test_refill_is_exact_to_the_token(limiters: Callable[..., SharedRateLimiter]) -> None:
    clock = FakeClock(0.0)
    shared = limiters(now=clock)
    limit = RateLimit(rate=0.1, burst=1)  # one request every ten seconds
    assert (await shared.charge("k", limit)).allowed
    for t in (1.0, 5.0, 9.999):
        clock.now = t
        assert not (await shared.charge("k", limit)).allowed
    clock.now = 10.0
    assert (await shared.charge("k", limit)).allowed
    refused = await shared.charge("k", limit)
    assert not refused.allowed and refused.retry_after_s == pytest.approx(10.0)
    assert refused.reset_s == pytest.approx(10.0) and refused.remaining == 0


async def test_a_clock_step_back_adds_nothing_and_a_new_limit_starts_full(
    limiters: Callable[..., SharedRateLimiter],
) -> None:
    clock = FakeClock(WALL)
    shared = limiters(now=clock)
    fast = RateLimit(rate=100, burst=2)
    assert (await shared.charge("k", fast)).remaining == 1
    assert (await shared.charge("k", fast)).remaining == 0
    clock.advance(-5)  # another server's clock, behind
    assert not (await shared.charge("k", fast)).allowed
    clock.advance(5)  # back where the bucket was: still nothing earned
    assert not (await shared.charge("k", fast)).allowed
    assert (await shared.charge("k", RateLimit(rate=1, burst=5))).remaining == 4
    assert (await shared.charge("other", fast)).remaining == 1  # a bucket per key


async def test_idle_buckets_expire_once_they_would_be_full(
    limiters: Callable[..., SharedRateLimiter], redis_url: str
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    shared = limiters(now=FakeClock(WALL), prefix=prefix)
    await shared.charge("caller", RateLimit(rate=0.5, burst=4), cost=3)
    with redis.Redis.from_url(redis_url) as raw:
        ttl_ms = raw.pttl(prefix + "caller")
        stored = raw.hgetall(prefix + "caller")
    assert 6000 < ttl_ms <= 7000  # 3 tokens at 0.5/s refill in 6 s, plus a second
    assert set(stored) == {b"tokens", b"updated", b"shape"}  # numbers as text, no pickle


async def test_without_an_injected_clock_the_store_keeps_time(
    limiters: Callable[..., SharedRateLimiter],
) -> None:
    shared = limiters()  # the script reads the store's TIME: one clock for every server
    limit = RateLimit(rate=0.001, burst=2)
    decisions = [await shared.charge("k", limit) for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[-1].retry_after_s == pytest.approx(1000.0, rel=0.01)


# -- shared between servers -----------------------------------------------------------------


async def test_a_burst_holds_across_servers(limiters: Callable[..., SharedRateLimiter]) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    one, two = limiters(prefix=prefix), limiters(prefix=prefix)
    limit = RateLimit(rate=0.001, burst=5)
    allowed = [(await (one if i % 2 else two).charge("caller", limit)).allowed
               for i in range(10)]
    assert allowed == [True] * 5 + [False] * 5  # five in all, not five per server


# -- outages --------------------------------------------------------------------------------


async def test_an_outage_falls_back_to_local_buckets_and_recovers(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock()
    errors: list[str] = []
    shared = _limiter(redis_server.url, clock=clock, retry_s=2, on_store_error=errors.append,
                      fallback=RateLimiter(clock=clock))
    limit = RateLimit(rate=0.001, burst=2)
    try:
        assert (await shared.charge("k", limit)).allowed
        assert (await shared.charge("k", limit)).allowed
        assert not (await shared.charge("k", limit)).allowed
        redis_server.stop()
        # This server's own bucket for the caller: full, so a burst is allowed again.
        local = [(await shared.charge("k", limit)).allowed for _ in range(3)]
        assert local == [True, True, False]
        assert errors == ["rate_limit"] * 3 and not shared.available
        redis_server.start()  # a fresh store: its buckets start full
        assert not (await shared.charge("k", limit)).allowed  # backing off: still local
        clock.advance(2)
        assert (await shared.charge("k", limit)).allowed  # the store's bucket again
        assert shared.available and len(errors) == 4
    finally:
        await shared.aclose()


# -- two apps over one store ----------------------------------------------------------------

MODEL = {"name": "m", "backend": "echo", "source": ".", "task": "embeddings"}


@pytest.fixture
async def two_apps(
    plugin_host: PluginHost, make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
    async with AsyncExitStack() as stack:

        async def start(url: str, **tables: Any) -> list[tuple[httpx.AsyncClient, Security]]:
            # A caller address of this test's own: buckets outlive a test in a shared store.
            address = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.1"
            apps = []
            for _ in range(2):
                settings = make_settings(models=[MODEL], cluster={"store": url}, **tables)
                service = InferenceService(settings, plugin_host)
                security = Security.from_settings(
                    settings.auth, plugin_host, store_url=settings.cluster.store
                )
                stack.push_async_callback(security.aclose)
                app = create_app(settings, plugins=plugin_host, service=service,
                                 security=security)
                await service.start()
                stack.push_async_callback(service.stop)
                client = httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app, client=(address, 4000)),
                    base_url="http://testserver",
                )
                await stack.enter_async_context(client)
                apps.append((client, security))
            return apps

        yield start


LIMITED = {"rate_limits": {"anonymous": {"rate": 0.001, "burst": 3}}}


async def test_a_limit_holds_across_two_apps(
    two_apps: Callable[..., Any], redis_url: str
) -> None:
    (a, _), (b, _) = await two_apps(redis_url, auth=LIMITED)
    answers = [await (a if i % 2 else b).get("/v1/models") for i in range(5)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    assert answers[2].headers["ratelimit"].startswith('"anonymous";r=0;t=')
    refused = answers[3]
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert int(refused.headers["retry-after"]) == pytest.approx(1000, rel=0.01)
    assert refused.headers["ratelimit-policy"] == '"anonymous";q=3;w=3000'


async def test_a_store_outage_means_local_limits_and_a_counted_warning(
    two_apps: Callable[..., Any], redis_server: RedisServer
) -> None:
    (a, security), (b, _) = await two_apps(redis_server.url, auth=LIMITED)
    redis_server.stop()
    # Each app keeps its own buckets meanwhile: 3 per app, never a failed request.
    answers = [await (a if i % 2 else b).get("/v1/models") for i in range(8)]
    assert sorted(r.status_code for r in answers) == [200] * 6 + [429] * 2
    assert security.metrics is not None
    scrape = security.metrics.exposition()[0].decode()
    assert ('modelyard_shared_store_errors_total{operation="rate_limit",store="redis"} 4.0'
            in scrape)


def test_a_store_url_that_is_not_redis_is_a_config_error(plugin_host: PluginHost) -> None:
    with pytest.raises(ConfigError) as caught:
        Security.from_settings(AuthSettings(), plugin_host, store_url="memcached://cache:11211")
    assert caught.value.detail.startswith("$.cluster.store: ")


@pytest.fixture
def no_redis_client(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import sys

    for name in [n for n in sys.modules if n == "redis" or n.startswith("redis.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "redis", None)
    yield


def test_a_store_without_the_client_installed_names_the_extra(
    plugin_host: PluginHost, no_redis_client: None
) -> None:
    with pytest.raises(ConfigError) as caught:
        Security.from_settings(AuthSettings(), plugin_host, store_url="redis://cache:6379/0")
    assert "modelyard[redis]" in caught.value.detail


async def test_cluster_store_in_the_config_makes_the_apps_limits_cluster_wide(
    plugin_host: PluginHost, make_settings: Callable[..., Settings], redis_url: str
) -> None:
    address = f"10.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}.2"
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(2):
            settings = make_settings(models=[MODEL], cluster={"store": redis_url}, auth=LIMITED)
            service = InferenceService(settings, plugin_host)
            app = create_app(settings, plugins=plugin_host, service=service)  # config only
            stack.push_async_callback(app.state["security"].aclose)
            await service.start()
            stack.push_async_callback(service.stop)
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(address, 1)),
                                       base_url="http://testserver")
            clients.append(await stack.enter_async_context(client))
        codes = [(await clients[i % 2].get("/v1/models")).status_code for i in range(4)]
        assert codes == [200, 200, 200, 429]
