"""Interactive latency with a batch job running (issue #23), on a fake backend (no model files).

    .venv/bin/python bench/batch_priority.py [--clients 4 --seconds 3 --rounds 3 --lines 3000]
        [--max-in-flight N] [--batches '{"checkpoint_every_lines": 1}']

Serves one embeddings model on the ``slow`` fake backend (each call costs
``delay + per_item * batch``) over a real uvicorn on 127.0.0.1. Each round measures the
latency of ``--clients`` closed-loop interactive clients for ``--seconds`` without a batch job,
then the same with a batch job of ``--lines`` lines running (uploaded to ``/v1/files``,
created on ``/v1/batches``), then waits (bounded) for that job to finish before the next
round. Prints the per-round p50/p99 of both conditions, the job's lines per second while
measured and its time to finish, the medians, the p99 ratio (target <= 1.25x) and whether
every job completed with all of its lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from typing import Any

import httpx

from modelyard import create_app
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings
from modelyard.testing import plugin as fake_plugin
from modelyard.testing import run_live_server

MODEL = "s"
DELAY_S = 0.005
PER_ITEM_S = 0.0002
MAX_BATCH = 8
BODY = {"model": MODEL, "input": "sixteen tokens of text"}
FINISHED = ("completed", "failed", "cancelled", "expired")


def _host() -> PluginHost:
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing")
    return host


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def _jsonl(lines: int) -> bytes:
    return b"".join(
        json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": MODEL, "input": f"batch line {i}"}}).encode() + b"\n"
        for i in range(lines)
    )


async def _interactive(client: httpx.AsyncClient, clients: int, seconds: float) -> list[float]:
    samples: list[float] = []
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            r = await client.post("/v1/embeddings", json=BODY)
            samples.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text

    await asyncio.gather(*(one() for _ in range(clients)))
    return samples


async def _batch(client: httpx.AsyncClient, batch_id: str) -> dict[str, Any]:
    r = await client.get(f"/v1/batches/{batch_id}")
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


async def _start_job(
    client: httpx.AsyncClient, payload: bytes, timeout: float
) -> tuple[str, int, float]:
    """The batch id, once it answers lines; its lines done then, and when it was created."""
    r = await client.post("/v1/files", files={"file": ("in.jsonl", payload)},
                          data={"purpose": "batch"})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/batches", json={"input_file_id": r.json()["id"],
                                               "endpoint": "/v1/embeddings",
                                               "completion_window": "24h"})
    assert r.status_code == 200, r.text
    batch_id: str = r.json()["id"]
    created = time.monotonic()
    deadline = created + timeout
    while True:  # measure only once lines are being answered
        batch = await _batch(client, batch_id)
        if batch["status"] == "in_progress" and batch["request_counts"]["completed"] > 0:
            return batch_id, batch["request_counts"]["completed"], created
        if batch["status"] in FINISHED or time.monotonic() > deadline:
            raise RuntimeError(f"batch did not start: {batch['status']}")
        await asyncio.sleep(0.02)


async def _finish(client: httpx.AsyncClient, batch_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        batch = await _batch(client, batch_id)
        if batch["status"] in FINISHED or time.monotonic() > deadline:
            return batch
        await asyncio.sleep(0.05)


async def _run(url: str, args: argparse.Namespace) -> tuple[list[Any], list[dict[str, Any]]]:
    payload = _jsonl(args.lines)
    rounds: list[Any] = []
    jobs: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30.0) as client:
        await _interactive(client, args.clients, 0.5)  # warm up
        for _ in range(args.rounds):
            alone = await _interactive(client, args.clients, args.seconds)
            batch_id, before, created = await _start_job(client, payload, args.job_timeout)
            shared = await _interactive(client, args.clients, args.seconds)
            during = await _batch(client, batch_id)
            during["lines_per_s"] = (during["request_counts"]["completed"] - before) / args.seconds
            done = await _finish(client, batch_id, args.job_timeout)
            done["took_s"] = time.monotonic() - created
            rounds.append((alone, shared, during))
            jobs.append(done)
    return rounds, jobs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lines", type=int, default=3000)
    parser.add_argument("--job-timeout", type=float, default=60.0,
                        help="longest wait for a job to start, then to finish (seconds)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="[batches] max_in_flight_per_model (default: the setting's)")
    parser.add_argument("--batches", type=json.loads, default={},
                        help="more [batches] settings, as a JSON object")
    args = parser.parse_args()
    share = dict(args.batches)
    if args.max_in_flight is not None:
        share["max_in_flight_per_model"] = args.max_in_flight

    with tempfile.TemporaryDirectory(prefix="modelyard-bench-") as cache_dir:
        settings = decode_settings({
            "cache_dir": cache_dir,
            "batches": share,
            "models": [{
                "name": MODEL, "backend": "slow", "source": ".", "task": "embeddings",
                "options": {"delay_s": DELAY_S, "per_item_s": PER_ITEM_S,
                            "max_batch_size": MAX_BATCH},
            }],
        }, env={})
        batches = settings.batches
        app = create_app(settings, plugins=_host())
        with run_live_server(app) as server:
            rounds, jobs = asyncio.run(_run(server.url, args))

    print(f"\n## Interactive latency, {args.clients} closed-loop clients, {args.seconds:g} s "
          f"per condition (call cost {DELAY_S * 1e3:g} ms + {PER_ITEM_S * 1e3:g} ms/item, "
          f"batch <= {MAX_BATCH}; batch share: max_in_flight_per_model "
          f"{batches.max_in_flight_per_model}, admit_below_queue_depth "
          f"{batches.admit_below_queue_depth})\n")
    print("| round | condition | requests | p50 ms   | p99 ms   | batch lines done          "
          "| job lines/s | job took s |")
    print("|-------|-----------|----------|----------|----------|---------------------------"
          "|-------------|------------|")
    p50s: dict[str, list[float]] = {"alone": [], "job": []}
    p99s: dict[str, list[float]] = {"alone": [], "job": []}
    for i, ((alone, shared, during), job) in enumerate(zip(rounds, jobs, strict=True), 1):
        for name, samples in (("alone", alone), ("job", shared)):
            p50s[name].append(_pct(samples, 0.5))
            p99s[name].append(_pct(samples, 0.99))
            lines = rate = took = ""
            if name == "job":
                lines = (f"{during['request_counts']['completed']} / {args.lines} "
                         f"({during['status']})")
                rate, took = f"{during['lines_per_s']:.0f}", f"{job['took_s']:.1f}"
            print(f"| {i:>5} | {name:<9} | {len(samples):8d} | {p50s[name][-1]:8.3f} "
                  f"| {p99s[name][-1]:8.3f} | {lines:<25} | {rate:>11} | {took:>10} |")
    med = {k: (statistics.median(p50s[k]), statistics.median(p99s[k])) for k in p50s}
    print("\n| condition | median p50 ms | median p99 ms |")
    print("|-----------|---------------|---------------|")
    for name in ("alone", "job"):
        print(f"| {name:<9} | {med[name][0]:13.3f} | {med[name][1]:13.3f} |")
    ratio = med["job"][1] / med["alone"][1]
    print(f"\ninteractive p99 with a job / without: {ratio:.2f}x (target <= 1.25x)")
    complete = all(j["status"] == "completed" and j["request_counts"]["completed"] == args.lines
                   for j in jobs)
    states = ", ".join(f"{j['status']} {j['request_counts']['completed']}/{args.lines}"
                       for j in jobs)
    print(f"jobs finished: {'yes' if complete else 'NO'} ({states})")


if __name__ == "__main__":
    main()
