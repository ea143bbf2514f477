"""Response cache over HTTP: miss vs. hit latency for a Gemma completion.

    .venv/bin/python bench/cache.py [--prompts 30] [--max-tokens 32] [--cache-dir DIR]

Serves the demo ``gemma-3-270m`` (llama.cpp) with ``[cache]`` tiers memory + disk (dedup) on a
real uvicorn on 127.0.0.1, then sends each of ``--prompts`` distinct greedy completions three
times from one keep-alive client:

1. miss: the first time (the model runs; the answer is stored);
2. memory hit: the same request again;
3. disk hit: again after the memory tier is emptied (read from disk, promoted to memory).

Prints p50/p90 per row, the miss/hit ratio, and checks every answer equals its miss.
Needs the gguf and cache extras, and the cache wired into the service (``X-Cache`` header).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from modelyard.api.app import create_app, load_plugins
from modelyard.cache import plugin as cache_plugin
from modelyard.core.service import InferenceService
from modelyard.core.settings import decode_settings
from modelyard.testing import run_live_server

PROMPTS = [
    "The capital of France is", "Water boils at", "The largest planet in the solar system is",
    "A haiku about autumn:", "The speed of light is", "Photosynthesis converts",
    "In 1969, humans first", "The Pythagorean theorem states that", "A good cup of tea needs",
    "The three primary colours are",
]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def _pass(
    client: httpx.AsyncClient, prompts: list[str], max_tokens: int
) -> tuple[list[float], list[str], list[Any]]:
    latencies, outcomes, answers = [], [], []
    for prompt in prompts:
        body = {
            "model": "gemma-3-270m",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        t = time.perf_counter()
        r = await client.post("/v1/completions", json=body)
        latencies.append(time.perf_counter() - t)
        r.raise_for_status()
        outcomes.append(r.headers.get("x-cache", ""))
        answers.append(r.json()["choices"])
    return latencies, outcomes, answers


async def _bench(url: str, service: InferenceService, prompts: list[str], max_tokens: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await _pass(client, ["warm-up: " + p for p in prompts[:2]], max_tokens)
        miss, miss_out, miss_answers = await _pass(client, prompts, max_tokens)
        if not all(miss_out):
            sys.exit("no X-Cache header: the response cache is not wired into this server yet")
        hit, hit_out, hit_answers = await _pass(client, prompts, max_tokens)
        assert service.cache is not None
        for _ in range(1000):  # stores finish after the answers are sent
            if (await client.get("/admin/cache")).json()["in_flight"] == 0:
                break
            await asyncio.sleep(0.01)
        # Memory only, so the next pass reads the disk tier. The server's loop runs in another
        # thread, but no request is in flight and clearing the LRU never touches a loop.
        await service.cache.tiers[0].clear()
        disk, disk_out, disk_answers = await _pass(client, prompts, max_tokens)
        rps, cpu = await _cached_throughput(url, prompts, max_tokens, concurrency=32, total=3000)
        stats = (await client.get("/admin/cache")).json()
    assert hit_answers == miss_answers and disk_answers == miss_answers, (
        "a hit differs from its miss"
    )
    rows = [("miss (model runs)", miss, miss_out), ("hit, memory tier", hit, hit_out),
            ("hit, disk tier", disk, disk_out)]
    print(
        f"gemma-3-270m completion, max_tokens={max_tokens}, {len(prompts)} prompts, HTTP keep-alive"
    )
    print(f"{'':20} {'X-Cache':>8} {'p50 ms':>9} {'p90 ms':>9} {'mean ms':>9}")
    for name, samples, outs in rows:
        label = "/".join(sorted(set(outs)))
        print(f"{name:20} {label:>8} {_pct(samples, 0.5):9.2f} {_pct(samples, 0.9):9.2f} "
              f"{statistics.mean(samples) * 1000:9.2f}")
    print(f"miss/hit p50 ratio: memory {_pct(miss, 0.5) / _pct(hit, 0.5):.0f}x, "
          f"disk {_pct(miss, 0.5) / _pct(disk, 0.5):.0f}x")
    print(f"cached answers at concurrency 32: {rps:.0f} requests/s "
          f"(client and server share this process; its CPU time: {cpu:.1f} s)")
    dedup = stats["tiers"][1]
    print(f"disk tier: {dedup['inner']['entries']} rows, {dedup['inner']['bytes']} bytes, "
          f"dedup ratio {dedup['dedup_ratio']}")


async def _cached_throughput(
    url: str, prompts: list[str], max_tokens: int, *, concurrency: int, total: int
) -> tuple[float, float]:
    """Requests/s of cached answers: ``concurrency`` keep-alive connections, ``total`` requests."""
    bodies = [{"model": "gemma-3-270m", "prompt": p, "max_tokens": max_tokens, "temperature": 0}
              for p in prompts]
    remaining = total
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                r = await client.post("/v1/completions", json=bodies[remaining % len(bodies)])
                assert r.headers.get("x-cache") == "HIT", r.headers.get("x-cache")

        cpu0 = time.process_time()
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        return total / elapsed, time.process_time() - cpu0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument(
        "--cache-dir", help="where the demo model is prepared (default: user cache)"
    )
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    host = load_plugins()
    if "memory" not in host.cache_tiers:  # before the entry point is installed
        host.register(cache_plugin, name="cache")
    if "gguf" not in host.backends:
        sys.exit("needs the gguf backend: pip install 'modelyard[gguf]'")
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (#{i})" for i in range(args.prompts)]
    with tempfile.TemporaryDirectory() as responses:
        raw: dict[str, Any] = {
            "models": [{"name": "gemma-3-270m", "backend": "gguf", "task": "completion",
                        "source": "demo:gemma-3-270m"}],
            "cache": {"enabled": True, "directory": str(Path(responses) / "cache"),
                      "tiers": [{"tier": "memory"}, {"tier": "disk", "dedup": True}]},
        }
        if args.cache_dir:
            raw["cache_dir"] = args.cache_dir
        settings = decode_settings(raw, env={})
        service = InferenceService(settings, host)
        app = create_app(settings, plugins=host, service=service)
        with run_live_server(app) as server:
            asyncio.run(_wait_and_bench(server.url, service, prompts, args.max_tokens))


async def _wait_and_bench(
    url: str, service: InferenceService, prompts: list[str], max_tokens: int
) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        for _ in range(6000):  # bounded: model preparation and load take seconds, not minutes
            if (await client.get("/v2/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            sys.exit("gemma-3-270m did not become ready")
    await _bench(url, service, prompts, max_tokens)


if __name__ == "__main__":
    main()
