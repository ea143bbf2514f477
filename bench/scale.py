"""Scale-out: single-process modelyard vs. the Ray engine (1 and 2 replicas), one machine.

    .venv/bin/python bench/scale.py [--ray-address 127.0.0.1:6391] [--rounds 3] [--seconds 3]
        [--only embeddings|chat] [--replicas 1 2] [--tokens 128] [--threads N]
        [--ray-env KEY=VALUE ...] [--no-handle-calls] [--cache-dir DIR] [--log-level LEVEL]

Joins a running Ray head (``ray start --head --port 6391 --num-cpus 2``). Each Ray contender
has a namespace of its own (``bench<hex>-r<N>``); at the end the bench's Ray driver deletes
whatever the ingresses left there (Serve applications, the coordinator actor).

Contenders, all started once as ``python -m modelyard serve`` subprocesses and kept loaded:
``single`` (one process), and per ``--replicas`` N a Ray ingress (``[cluster] engine = "ray"``,
modelyard's own uvicorn calling the replicas through deployment handles) whose models have
``replicas = N``. Both models are in every config: ``minilm`` (the demo all-MiniLM-L6-v2,
onnx, embeddings) and ``smollm2`` (the demo SmolLM2-135M-Instruct, gguf, chat); the demo
models are prepared once into ``--cache-dir`` (default: modelyard's user cache).

Each round measures, contenders in a new order every round; the tables show medians:

1. lone embeddings requests: one keep-alive connection per contender, one 16-token sentence
   per request, the contenders' requests interleaved one by one in a shuffled order (so every
   request meets the same background load and idle gap); p50 and p99. A Ray contender's p50
   minus single's is what the Ray path adds (target <= 6 ms);
2. Ray's own hop, from the bench's Ray driver (a subprocess): deployment-handle calls of
   ``infer`` on the 1-replica ``minilm`` (driver -> replica: no HTTP, no ingress) and of
   ``check_health`` (a call that does no work: the per-call floor);
3. embeddings throughput: closed-loop concurrency 32, one sentence per request (target: Ray
   >= 0.7x single), and the CPU each role spent per request, read from /proc: the server
   (single), the ingress, the replicas, Ray's own processes (raylet, GCS, Serve controller:
   shared with anything else using that Ray) and this client;
4. SmolLM2 chat: a lone stream's decode tokens/s and time to first token, then the aggregate
   tokens/s of 8 concurrent streams, ``--tokens`` greedy tokens each, and CPU per token.

Read the throughput ratios with the CPU rows. Ray replicas reserve no CPU (``num_cpus = 0``),
so every contender shares the same cores; when other work keeps the machine busy, the
scheduler gives a contender with more busy processes (ingress + replicas) a larger share of
it, which flatters Ray's ratio. The "server side total" CPU per request is what a machine
whose cores are all busy with this work divides its CPU by.

``--ray-env`` sets environment variables for the Ray contenders' ingresses and replicas
(``ray_actor_options.runtime_env``): Ray Serve's tuning knobs, or ``PYTHONPATH`` to bench
another checkout of modelyard.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

EMBED_MODEL = "minilm"
CHAT_MODEL = "smollm2"
WORDS = (
    "river mountain quiet engine paper window garden music yellow thunder silver bread lamp "
    "forest ocean clock market winter pencil harbor valley bridge stone candle meadow rocket "
    "violin tiger cloud orange"
).split()
SUBJECTS = (
    "the history of the printing press", "how glaciers shape valleys", "a day in a bakery",
    "the migration of monarch butterflies", "the first transatlantic cable",
    "how bees make honey", "the northern lights", "the making of paper",
    "a garden on a rooftop", "the life cycle of stars", "the Amazon rainforest",
    "the history of the bicycle",
)
CHAT_PROMPTS = [f"Write a long, detailed article about {s}." for s in SUBJECTS]
THROUGHPUT_CONCURRENCY = 32
CHAT_CONCURRENCY = 8


# -- inputs ------------------------------------------------------------------------------------


def sentences(cache_dir: Path, count: int, tokens: int = 16) -> list[str]:
    """Distinct sentences that each tokenise to exactly ``tokens`` MiniLM tokens."""
    from tokenizers import Tokenizer

    from modelyard import demo

    model_dir = demo.prepare("all-minilm-l6-v2", cache_dir, lambda p, _: print(f"  {p}"))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    rng = random.Random(0)
    out: list[str] = []
    while len(out) < count:
        text = " ".join(rng.choice(WORDS) for _ in range(tokens - 2))
        if len(tokenizer.encode(text).ids) == tokens:
            out.append(text)
    return out


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def models_toml(
    models: list[str], replicas: int | None, threads: int, ray_env: dict[str, str]
) -> str:
    placement = "" if replicas is None else f"replicas = {replicas}\n"
    if replicas is not None and ray_env:
        env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in ray_env.items())
        placement += f"ray_actor_options = {{ runtime_env = {{ env_vars = {{ {env} }} }} }}\n"
    parts = []
    if EMBED_MODEL in models:
        parts.append(
            f'[[models]]\nname = "{EMBED_MODEL}"\nbackend = "onnx"\n'
            f'source = "demo:all-minilm-l6-v2"\ntask = "embeddings"\n{placement}'
        )
    if CHAT_MODEL in models:
        parts.append(
            f'[[models]]\nname = "{CHAT_MODEL}"\nbackend = "gguf"\n'
            f'source = "demo:smollm2-135m-instruct"\ntask = "chat"\n{placement}'
            f'[models.options]\nparallel = {CHAT_CONCURRENCY}\nn_ctx = 1024\n'
            f'n_threads = {threads}\nflash_attn = "off"\n'
        )
    return "\n".join(parts)


@dataclass
class Contender:
    """One ``modelyard serve`` process under test."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    #: The Ray namespace of its models (None: single process).
    namespace: str | None

    def app(self, model: str) -> str:
        """The Serve application of ``model``'s version 1 (plugins/ray/names.py)."""
        return f"{self.namespace}-{model}-1"

    def pids(self, ray_system: list[int]) -> dict[str, list[int]]:
        """The processes whose CPU serves this contender, by role."""
        if self.namespace is None:
            return {"server": [self.process.pid]}
        return {
            "ingress": [self.process.pid],
            "replicas": replica_pids(f"{self.namespace}-"),
            "ray system": ray_system,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_contender(
    name: str, replicas: int | None, args: argparse.Namespace, workdir: Path, run_id: str,
    *, ray_env: dict[str, str] | None = None, tag: str = "",
) -> Contender:
    """``ray_env``: environment of a Ray contender's ingress and replicas (Serve's knobs)."""
    ray_env = {} if replicas is None else dict(args.ray_env if ray_env is None else ray_env)
    port = free_port()
    namespace = None if replicas is None else f"bench{run_id}-r{replicas}{tag}"
    cluster = "" if namespace is None else (
        f'[cluster]\nengine = "ray"\naddress = "{args.ray_address}"\n'
        f'namespace = "{namespace}"\n\n'
    )
    config = workdir / f"{name.replace(' ', '')}.toml"
    config.write_text(
        f'cache_dir = "{args.cache_dir}"\n\n[server]\nlog_level = "{args.log_level}"\n'
        f'log_format = "text"\n\n{cluster}'
        + models_toml(args.models, replicas, args.threads, ray_env)
    )
    log = workdir / f"{config.stem}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", **ray_env}
    process = subprocess.Popen(
        [sys.executable, "-m", "modelyard", "serve", "--config", str(config), "--port",
         str(port)],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )
    return Contender(name, process, f"http://127.0.0.1:{port}", log, namespace)


def wait_ready(contenders: list[Contender], timeout_s: float = 600) -> None:
    pending = list(contenders)
    deadline = time.monotonic() + timeout_s
    while pending:
        for contender in list(pending):
            if contender.process.poll() is not None:
                raise SystemExit(f"{contender.name} exited; see {contender.log}:\n"
                                 + contender.log.read_text()[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(contender.url + "/v2/health/ready", timeout=2).status_code == 200:
                    pending.remove(contender)
        if time.monotonic() > deadline:
            raise SystemExit(f"never ready: {[c.name for c in pending]}")
        time.sleep(0.5)


def ps() -> list[tuple[int, str]]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [(int(pid), args) for pid, _, args in (ln.strip().partition(" ") for ln in
                                                   out.splitlines()) if pid]


def replica_pids(app_prefix: str) -> list[int]:
    return [pid for pid, args in ps() if args.startswith(f"ray::ServeReplica:{app_prefix}")]


def ray_system_pids() -> list[int]:
    """Ray's per-node and control processes (shared with anything else using this Ray)."""
    names = ("raylet", "gcs_server", "ray::ServeController")
    return [pid for pid, args in ps()
            if any(args.startswith(n) or f"/{n} " in args for n in names)]


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def cpu_meter(groups: dict[str, list[int]], out: dict[str, float]) -> Iterator[None]:
    """CPU seconds each group of processes (and this client) spent inside the block."""
    before = {g: sum(cpu_s(p) for p in pids) for g, pids in groups.items()}
    client = time.process_time()
    yield
    for g, pids in groups.items():
        out[g] = sum(cpu_s(p) for p in pids) - before[g]
    out["client"] = time.process_time() - client


# -- the bench's Ray driver (a subprocess, so Ray's threads stay out of the load client) -------


def driver_main(address: str) -> None:
    """Answer JSON lines: ``{"app", "seconds", "text"}`` with handle-call latencies (ms);
    ``{"cleanup": [namespace, ...]}`` by deleting what those namespaces left in Ray."""
    import logging

    import ray
    from ray import serve

    from modelyard.core.types import EmbeddingRequest
    from modelyard.plugins.ray.names import COORDINATOR

    # Answers go to the bench on the original stdout; whatever Ray prints goes to the log.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    ray.init(address=address, namespace=f"bench-driver-{os.getpid()}", log_to_driver=False,
             logging_level=logging.WARNING)

    async def timed(call: Callable[[], Any], seconds: float) -> list[float]:
        for _ in range(5):
            await call()
        samples: list[float] = []
        stop_at = time.perf_counter() + seconds
        while time.perf_counter() < stop_at or len(samples) < 20:
            t = time.perf_counter()
            await call()
            samples.append((time.perf_counter() - t) * 1000)
        return samples

    def cleanup(namespaces: list[str]) -> dict[str, Any]:
        """Apps and coordinators an ingress left (one killed, or cut short at SIGTERM)."""
        prefixes = tuple(f"{ns}-" for ns in namespaces)
        apps = [a for a in serve.status().applications if a.startswith(prefixes)]
        for app in apps:
            serve.delete(app, _blocking=True)
        coordinators = 0
        for ns in namespaces:
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(COORDINATOR, namespace=ns))
                coordinators += 1
        return {"apps": apps, "coordinators": coordinators}

    async def handle_calls(app: str, text: str, seconds: float) -> dict[str, Any]:
        handle = serve.get_app_handle(app)
        batch = [EmbeddingRequest((text,))]
        infer = await timed(lambda: handle.infer.remote(batch, None), seconds)
        noop = await timed(lambda: handle.check_health.remote(), seconds)
        return {"infer": infer, "noop": noop}

    async def answer() -> None:
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            order = json.loads(line)
            if "cleanup" in order:
                reply = cleanup(order["cleanup"])
            else:
                reply = await handle_calls(order["app"], order["text"], order["seconds"])
            print(json.dumps(reply), file=answers, flush=True)

    asyncio.run(answer())


class RayDriver:
    """The bench's side of ``driver_main``."""

    def __init__(self, address: str, log: Path) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--driver", address], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=log.open("wb"), text=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
        self._log = log

    def ask(self, order: dict[str, Any]) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(order) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's Ray driver exited; see {self._log}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self._proc.stdin is not None
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        if self._proc.poll() is None:
            self._proc.kill()


# -- load --------------------------------------------------------------------------------------


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))]


async def embed(http: httpx.AsyncClient, text: str) -> float:
    t = time.perf_counter()
    response = await http.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": text})
    elapsed = (time.perf_counter() - t) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{http.base_url} answered {response.status_code}: {response.text}")
    return elapsed


async def lone_embeddings(
    contenders: list[Contender], texts: list[str], seconds: float, rng: random.Random
) -> dict[str, list[float]]:
    """Latencies (ms) of requests sent one at a time, contenders interleaved request by request."""
    clients = {c.name: httpx.AsyncClient(base_url=c.url, timeout=60) for c in contenders}
    samples: dict[str, list[float]] = {c.name: [] for c in contenders}
    order = list(clients.items())
    try:
        for _, http in order:  # warm each connection
            for text in texts[:5]:
                await embed(http, text)
        stop_at = time.perf_counter() + seconds * len(order)
        i = 0
        while time.perf_counter() < stop_at or i < 20:
            rng.shuffle(order)
            for name, http in order:
                samples[name].append(await embed(http, texts[i % len(texts)]))
            i += 1
    finally:
        for http in clients.values():
            await http.aclose()
    return samples


@dataclass
class Throughput:
    rate: float
    p50: float
    p99: float
    errors: int
    #: CPU ms per request, by process role.
    cpu_ms: dict[str, float]


async def embeddings_throughput(
    contender: Contender, texts: list[str], seconds: float, ray_system: list[int]
) -> Throughput:
    limits = httpx.Limits(max_connections=THROUGHPUT_CONCURRENCY,
                          max_keepalive_connections=THROUGHPUT_CONCURRENCY)
    async with httpx.AsyncClient(base_url=contender.url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(embed(http, texts[k]) for k in range(THROUGHPUT_CONCURRENCY)))
        latencies: list[float] = []
        errors = 0
        stop_at = time.perf_counter() + seconds

        async def worker(k: int) -> None:
            nonlocal errors
            i = k
            while time.perf_counter() < stop_at:
                try:
                    latencies.append(await embed(http, texts[i % len(texts)]))
                except (RuntimeError, httpx.HTTPError):
                    errors += 1
                i += THROUGHPUT_CONCURRENCY

        cpu: dict[str, float] = {}
        with cpu_meter(contender.pids(ray_system), cpu):
            start = time.perf_counter()
            await asyncio.gather(*(worker(k) for k in range(THROUGHPUT_CONCURRENCY)))
            elapsed = time.perf_counter() - start
    done = max(1, len(latencies))
    return Throughput(len(latencies) / elapsed, pct(latencies, 0.5), pct(latencies, 0.99),
                      errors, {g: s * 1000 / done for g, s in cpu.items()})


@dataclass
class Stream:
    tokens: int
    ttft_ms: float
    decode_tok_s: float


async def chat_stream(http: httpx.AsyncClient, prompt: str, tokens: int) -> Stream:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                stamps.append(time.perf_counter())
    count = usage if usage is not None else len(stamps)
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return Stream(count, (stamps[0] - started) * 1000 if stamps else 0.0, decode)


async def chat_round(
    contender: Contender, prompts: list[str], tokens: int, ray_system: list[int]
) -> tuple[Stream, float, dict[str, float]]:
    """A lone stream, then the aggregate tokens/s of ``CHAT_CONCURRENCY`` concurrent streams
    and the CPU ms each role spent per generated token."""
    limits = httpx.Limits(max_connections=CHAT_CONCURRENCY)
    async with httpx.AsyncClient(base_url=contender.url, timeout=600, limits=limits) as http:
        await chat_stream(http, "Say hello.", 8)
        lone = await chat_stream(http, prompts[0], tokens)
        cpu: dict[str, float] = {}
        with cpu_meter(contender.pids(ray_system), cpu):
            start = time.perf_counter()
            streams = await asyncio.gather(
                *(chat_stream(http, prompts[k % len(prompts)], tokens)
                  for k in range(CHAT_CONCURRENCY))
            )
            elapsed = time.perf_counter() - start
    generated = sum(s.tokens for s in streams)
    return lone, generated / elapsed, {g: s * 1000 / max(1, generated) for g, s in cpu.items()}


# -- rounds ------------------------------------------------------------------------------------


@dataclass
class Results:
    lone: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (p50, p99)
    hop: list[tuple[float, float, float]] = field(default_factory=list)  # infer p50/p99, noop
    throughput: dict[str, list[Throughput]] = field(default_factory=dict)
    chat: dict[str, list[tuple[Stream, float, dict[str, float]]]] = field(default_factory=dict)
    load: list[str] = field(default_factory=list)


def run_rounds(
    contenders: list[Contender], driver: RayDriver | None, texts: list[str],
    args: argparse.Namespace,
) -> Results:
    results = Results()
    rng = random.Random(1)
    ray_system = ray_system_pids()
    ray_one = next((c for c in contenders if c.namespace and c.namespace.endswith("-r1")), None)
    for rnd in range(args.rounds):
        results.load.append(" ".join(f"{x:.1f}" for x in os.getloadavg()))
        order = contenders[rnd % len(contenders):] + contenders[:rnd % len(contenders)]
        if EMBED_MODEL in args.models:
            lone = asyncio.run(lone_embeddings(order, texts, args.seconds, rng))
            for name, samples in lone.items():
                results.lone.setdefault(name, []).append((pct(samples, 0.5), pct(samples, 0.99)))
            if driver is not None and ray_one is not None and args.handle_calls:
                answer = driver.ask({"app": ray_one.app(EMBED_MODEL), "seconds": args.seconds,
                                    "text": texts[rnd]})
                results.hop.append((pct(answer["infer"], 0.5), pct(answer["infer"], 0.99),
                                    pct(answer["noop"], 0.5)))
            for contender in order:
                result = asyncio.run(
                    embeddings_throughput(contender, texts, args.seconds, ray_system)
                )
                results.throughput.setdefault(contender.name, []).append(result)
        if CHAT_MODEL in args.models:
            start = (rnd * 5) % len(CHAT_PROMPTS)
            prompts = CHAT_PROMPTS[start:] + CHAT_PROMPTS[:start]
            for contender in order:
                results.chat.setdefault(contender.name, []).append(
                    asyncio.run(chat_round(contender, prompts, args.tokens, ray_system))
                )
        print(f"  round {rnd + 1}/{args.rounds} done, load {os.getloadavg()}", flush=True)
    return results


# -- report ------------------------------------------------------------------------------------

COL = 12
ROLES = ("server", "ingress", "replicas", "ray system", "client")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Table:
    """Rows of one figure per contender, then the Ray contenders against single."""

    def __init__(self, names: list[str], versus: str) -> None:
        self.names = names
        print(f"{'':36}" + "".join(f"{n:>{COL}}" for n in names)
              + "".join(f"{versus + ' ' + n.removeprefix('ray '):>{COL}}" for n in names[1:]))

    def row(self, label: str, values: list[float], fmt: str, versus: str = "") -> None:
        """``versus``: ``ratio`` (each / single), ``diff`` (each - single) or nothing."""
        cells = "".join(f"{v:{COL}{fmt}}" if v == v else f"{'-':>{COL}}" for v in values)
        if versus == "ratio":
            cells += "".join(f"{v / values[0]:{COL - 1}.2f}x" for v in values[1:])
        elif versus == "diff":
            cells += "".join(f"{v - values[0]:+{COL}{fmt}}" for v in values[1:])
        print(f"{label:36}{cells}")


def cpu_rows(table: Table, label: str, runs: dict[str, list[dict[str, float]]]) -> None:
    """CPU ms per unit by process role, and the server side's total (everything but the
    client): what a machine whose cores are all busy with this work divides its CPU by."""
    names = table.names
    for role in ROLES:
        if any(role in r for n in names for r in runs[n]):
            table.row(f"{label}: {role}",
                      [med([r[role] for r in runs[n] if role in r]) for n in names], ".2f")
    totals = [med([sum(v for k, v in r.items() if k != "client") for r in runs[n]])
              for n in names]
    table.row(f"{label}: server side total", totals, ".2f", "ratio")


def report_embeddings(names: list[str], results: Results, args: argparse.Namespace) -> None:
    print(f"\n## MiniLM embeddings, one 16-token sentence per request, medians of "
          f"{args.rounds} rounds\n")
    lone = Table(names, "-")
    for label, k in (("lone request p50 ms", 0), ("lone request p99 ms", 1)):
        lone.row(label, [med([r[k] for r in results.lone[n]]) for n in names], ".2f", "diff")
    if results.hop:
        infer50 = med([h[0] for h in results.hop])
        print(f"\nhandle call from a Ray driver to the 1 replica (no HTTP, no ingress): "
              f"infer p50 {infer50:.2f} ms, p99 {med([h[1] for h in results.hop]):.2f} ms; "
              f"a call doing nothing (check_health) p50 {med([h[2] for h in results.hop]):.2f} ms")
        if "ray x1" in results.lone:
            over = med([r[0] for r in results.lone["ray x1"]]) - infer50
            print(f"ray x1 lone p50 over that handle call (the ingress: HTTP, pipeline, its "
                  f"batcher): {over:+.2f} ms")
    print()
    tp = {n: results.throughput[n] for n in names}
    table = Table(names, "/")
    c = THROUGHPUT_CONCURRENCY
    table.row(f"c={c} requests/s", [med([t.rate for t in tp[n]]) for n in names], ".1f", "ratio")
    table.row(f"c={c} p50 ms", [med([t.p50 for t in tp[n]]) for n in names], ".1f")
    table.row(f"c={c} p99 ms", [med([t.p99 for t in tp[n]]) for n in names], ".1f")
    table.row("errors (all rounds)", [float(sum(t.errors for t in tp[n])) for n in names], ".0f")
    cpu_rows(table, "CPU ms/request", {n: [t.cpu_ms for t in tp[n]] for n in names})


def report_chat(names: list[str], results: Results, args: argparse.Namespace) -> None:
    print(f"\n## SmolLM2 chat, {args.tokens} greedy tokens, {args.threads} llama.cpp threads "
          f"per instance, medians of {args.rounds} rounds\n")
    runs = {n: results.chat[n] for n in names}
    table = Table(names, "/")
    table.row("lone stream decode tok/s", [med([r[0].decode_tok_s for r in runs[n]])
                                           for n in names], ".1f", "ratio")
    table.row("lone stream TTFT ms", [med([r[0].ttft_ms for r in runs[n]]) for n in names],
              ".0f", "ratio")
    table.row(f"c={CHAT_CONCURRENCY} aggregate tok/s",
              [med([r[1] for r in runs[n]]) for n in names], ".1f", "ratio")
    cpu_rows(table, f"c={CHAT_CONCURRENCY} CPU ms/token", {n: [r[2] for r in runs[n]]
                                                           for n in names})


def report(contenders: list[Contender], results: Results, args: argparse.Namespace) -> None:
    names = [c.name for c in contenders]
    print(f"\nload average (1, 5, 15 min) at each round's start: {'; '.join(results.load)}")
    if results.lone:
        report_embeddings(names, results, args)
    if results.chat:
        report_chat(names, results, args)
    if results.lone:
        print()
        single_p50 = med([r[0] for r in results.lone[names[0]]])
        single_rate = med([t.rate for t in results.throughput[names[0]]])
        for n in names[1:]:
            added = med([r[0] for r in results.lone[n]]) - single_p50
            ratio = med([t.rate for t in results.throughput[n]]) / single_rate
            print(f"{n}: adds {added:+.2f} ms to a lone request's p50 (target <= 6 ms: "
                  f"{'met' if added <= 6 else 'MISSED'}); c={THROUGHPUT_CONCURRENCY} at "
                  f"{ratio:.2f}x single (target >= 0.7x: {'met' if ratio >= 0.7 else 'MISSED'})")
    sys.stdout.flush()


# -- main --------------------------------------------------------------------------------------


def ray_reachable(address: str) -> bool:
    """Whether the Ray head's GCS port answers (``auto`` and ``ray://`` are left to Ray)."""
    host, _, port = address.rpartition(":")
    if address == "auto" or address.startswith("ray://") or not port.isdigit():
        return True
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError:
        return False
    return True


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--driver":
        driver_main(sys.argv[2])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ray-address", default="127.0.0.1:6391",
                        help="a running Ray head to join (ray start --head --port 6391)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="measuring time per contender of the lone and c=32 phases")
    parser.add_argument("--only", choices=["embeddings", "chat"], default=None)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2],
                        help="one Ray contender per replica count")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per chat stream")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama.cpp threads of each SmolLM2 instance")
    parser.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the Ray ingresses and replicas, e.g. "
                        "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0 (repeatable)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"],
                        help="the servers' log level (their logs are kept when a run fails)")
    parser.add_argument("--no-handle-calls", dest="handle_calls", action="store_false",
                        help="skip the deployment-handle calls from the bench's Ray driver")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the demo models are prepared (default: modelyard's cache)")
    args = parser.parse_args()
    args.ray_env = dict(item.split("=", 1) for item in args.ray_env)
    args.models = {None: [EMBED_MODEL, CHAT_MODEL], "embeddings": [EMBED_MODEL],
                   "chat": [CHAT_MODEL]}[args.only]

    from modelyard import demo
    from modelyard.core.settings import cache_dir_of, decode_settings

    args.cache_dir = (args.cache_dir or Path(cache_dir_of(decode_settings({}, env={})))).resolve()
    if not ray_reachable(args.ray_address):
        raise SystemExit(f"no Ray at {args.ray_address}: start one with "
                         "`.venv/bin/ray start --head --port 6391 --num-cpus 2`")
    texts = sentences(args.cache_dir, 512) if EMBED_MODEL in args.models else []
    if CHAT_MODEL in args.models:  # prepared once here, not by three servers at once
        demo.prepare("smollm2-135m-instruct", args.cache_dir, lambda p, _: print(f"  {p}"))
    print(f"cores: {os.cpu_count()}  ray: {args.ray_address}  models: {args.models}  "
          f"load: {os.getloadavg()}", flush=True)

    run_id = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    contenders: list[Contender] = []
    driver: RayDriver | None = None
    keep = True
    try:
        started = time.monotonic()
        contenders.append(start_contender("single", None, args, workdir, run_id))
        for n in args.replicas:
            contenders.append(start_contender(f"ray x{n}", n, args, workdir, run_id))
        if args.replicas:
            driver = RayDriver(args.ray_address, workdir / "driver.log")
        wait_ready(contenders)
        print(f"all {len(contenders)} servers ready in {time.monotonic() - started:.0f} s",
              flush=True)
        results = run_rounds(contenders, driver, texts, args)
        report(contenders, results, args)
        keep = False
    finally:
        for contender in contenders:
            contender.stop()
        if driver is not None:
            namespaces = [c.namespace for c in contenders if c.namespace]
            try:
                left = driver.ask({"cleanup": namespaces})
                if left["apps"]:
                    print(f"deleted what the ingresses left in Ray: {left['apps']}")
            except (RuntimeError, OSError, ValueError) as exc:
                keep = True
                print(f"could not clean up namespaces {namespaces} in Ray: {exc}",
                      file=sys.stderr)
            driver.close()
        if keep:
            print(f"server logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
