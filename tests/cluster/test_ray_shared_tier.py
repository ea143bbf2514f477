"""Two Ray ingresses sharing a Redis tier: an answer computed through one is a hit on the
other, and a key's rate limit holds across both."""

from __future__ import annotations

import uuid

import pytest

from conftest import Ingress, StartIngress

MODELS = '''
[[models]]
name = "echo"
backend = "echo"
source = "."
task = "chat"
'''


@pytest.fixture(scope="module")
def pair(start_ingress: StartIngress, redis_url: str) -> list[Ingress]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    shared = f'''
store = "{redis_url}"

[cache]
enabled = true
secret = "{"s" * 32}"

[[cache.tiers]]
tier = "memory"

[[cache.tiers]]
tier = "redis"
options = {{ url = "{redis_url}", prefix = "{prefix}" }}

[auth]
rate_limits = {{ anonymous = {{ rate = 0.001, burst = 6 }} }}
'''
    return [start_ingress(MODELS, extra=shared), start_ingress(MODELS, extra=shared)]


def _chat(ingress: Ingress, text: str) -> tuple[int, str | None]:
    with ingress.client() as http:
        r = http.post("/v1/chat/completions", json={
            "model": "echo", "temperature": 0, "messages": [{"role": "user", "content": text}],
        })
    return r.status_code, r.headers.get("x-cache")


def test_an_answer_computed_through_one_ingress_is_a_hit_on_the_other(
    pair: list[Ingress],
) -> None:
    a, b = pair
    assert _chat(a, "computed on a") == (200, "MISS")
    assert _chat(b, "computed on a") == (200, "HIT")  # b's own memory tier never saw it
    # Two requests so far: six more overdraw the shared bucket of 6 by two.
    statuses = [_chat(pair[i % 2], f"spend {i}")[0] for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]  # 6 across both ingresses, not 6 each
