"""Engine overhead and batching gain, on fake backends (no model files).

    .venv/bin/python bench/engine_overhead.py [--requests 2000]

Prints three tables:
1. per-request latency of a bare backend call vs. the same call through InferenceService
   (queue, batcher, version lookup) in-process, p50/p99, and the overhead;
2. the same request over HTTP (real uvicorn on 127.0.0.1, one keep-alive client);
3. throughput at concurrency 32 on a backend whose call costs ``fixed + per_item * batch``,
   with batching off (max_batch_size 1) and on (32), and the gain.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time

import httpx

from modelyard.api.app import create_app
from modelyard.core.backend import LoadContext
from modelyard.core.plugins import PluginHost
from modelyard.core.service import InferenceService
from modelyard.core.settings import decode_settings
from modelyard.core.types import EmbeddingRequest, Task
from modelyard.testing import EchoBackend, EchoOptions, run_live_server
from modelyard.testing import plugin as fake_plugin

FIXED_S = 0.005
PER_ITEM_S = 0.0002


def _host() -> PluginHost:
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing")
    return host


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


async def _in_process(n: int) -> tuple[list[float], list[float]]:
    request = EmbeddingRequest(("sixteen tokens of text",))
    backend = EchoBackend(LoadContext("b", "1", Task.EMBEDDINGS, ".", None, EchoOptions()))
    bare = []
    for _ in range(n):
        t = time.perf_counter()
        await backend.infer([request])
        bare.append(time.perf_counter() - t)
    settings = decode_settings({"models": [{"name": "e", "backend": "echo", "source": ".",
                                            "task": "embeddings"}]}, env={})
    service = InferenceService(settings, _host())
    await service.start()
    await service.wait_until_loaded()
    served = []
    for _ in range(n):
        t = time.perf_counter()
        await service.infer("e", request)
        served.append(time.perf_counter() - t)
    await service.stop()
    return bare, served


async def _http(url: str, n: int) -> list[float]:
    body = {"model": "e", "input": "sixteen tokens of text"}
    async with httpx.AsyncClient(base_url=url) as client:
        for _ in range(50):
            await client.post("/v1/embeddings", json=body)
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            r = await client.post("/v1/embeddings", json=body)
            samples.append(time.perf_counter() - t)
            assert r.status_code == 200
    return samples


async def _throughput(max_batch: int, total: int, concurrency: int) -> tuple[float, float]:
    settings = decode_settings({"models": [{
        "name": "s", "backend": "slow", "source": ".", "task": "embeddings",
        "options": {"delay_s": FIXED_S, "per_item_s": PER_ITEM_S, "max_batch_size": 64},
        "batching": {"max_batch_size": max_batch},
    }]}, env={})
    service = InferenceService(settings, _host())
    await service.start()
    await service.wait_until_loaded()
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await service.infer("s", EmbeddingRequest(("x",)))

    t = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t
    batcher = service.registry.get("s").batcher
    batches = batcher.batches_run if batcher else 0
    await service.stop()
    return total / elapsed, total / max(1, batches)


def _row(name: str, samples: list[float]) -> str:
    return f"| {name:<28} | {_pct(samples, 0.5):8.3f} | {_pct(samples, 0.99):8.3f} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    n = args.requests

    bare, served = asyncio.run(_in_process(n))
    print("\n## In-process (echo backend, embeddings)\n")
    print("| path                         | p50 ms   | p99 ms   |")
    print("|------------------------------|----------|----------|")
    print(_row("bare backend.infer", bare))
    print(_row("InferenceService.infer", served))
    overhead = statistics.median(served) - statistics.median(bare)
    print(f"\nengine overhead p50: {overhead * 1e3:.3f} ms (target <= 0.2 ms)")

    settings = decode_settings({"models": [{"name": "e", "backend": "echo", "source": ".",
                                            "task": "embeddings"}]}, env={})
    app = create_app(settings, plugins=_host())
    with run_live_server(app) as server:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
        http = asyncio.run(_http(server.url, n))
        cpu1 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    print("\n## Over HTTP (uvicorn on 127.0.0.1, one keep-alive client, same process)\n")
    print("| path                         | p50 ms   | p99 ms   |")
    print("|------------------------------|----------|----------|")
    print(_row("POST /v1/embeddings", http))
    print(f"\nprocess CPU time during the HTTP run (client + server): {cpu1 - cpu0:.2f} s")

    total, conc = 2000, 32
    off, off_size = asyncio.run(_throughput(1, total, conc))
    on, on_size = asyncio.run(_throughput(32, total, conc))
    print(f"\n## Batching gain at concurrency {conc} "
          f"(call cost {FIXED_S * 1e3:g} ms + {PER_ITEM_S * 1e3:g} ms/item)\n")
    print("| batching          | req/s    | mean batch |")
    print("|-------------------|----------|------------|")
    print(f"| off (max 1)       | {off:8.1f} | {off_size:10.1f} |")
    print(f"| on  (max 32)      | {on:8.1f} | {on_size:10.1f} |")
    print(f"\nbatching gain: {on / off:.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
