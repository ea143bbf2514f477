"""The session's Redis answers (the fixture the cluster tests share)."""

from __future__ import annotations

import redis


def test_redis_fixture_answers(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
    finally:
        client.close()
