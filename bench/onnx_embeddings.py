"""MiniLM embeddings: bare onnxruntime vs. modelyard over HTTP, in one run.

    .venv/bin/python bench/onnx_embeddings.py [--seconds 4] [--repeats 3] [--cache-dir DIR]
        [--max-batch-size N] [--options JSON]

1. bare: tokenizers + onnxruntime + mean pooling + L2 in this process, batch 1/8/32;
2. served: a real ``modelyard serve`` (uvicorn, its own process) on 127.0.0.1 with the demo
   ``all-minilm-l6-v2``, one sentence per POST /v1/embeddings, closed-loop concurrency
   1/8/32 from one asyncio process speaking raw HTTP/1.1 keep-alive (the lightest client);
3. the ratios: served c32 / bare b32 (target >= 0.85) and lone request p50 vs. bare b1
   (target <= bare + 2 ms), plus the client's and the server's CPU seconds;
4. the floor and the reference for the lone figure, both ``bench/floor_server.py`` on the
   same uvicorn and paired with bare calls in turn with modelyard: the floor is an empty
   Litestar app answering a fixed embedding; the reference runs this bench's bare call on a
   thread of its own, the least a Litestar server that keeps its event loop free can do. A
   server that sat idle through a bare call answers slower than a busy one on this VM (see
   docs/backends/onnx.md); the floor shows what any Litestar server pays for that, and the
   reference what is left of the lone target for modelyard's own work.

Bare and served rows interleave, ``--repeats`` rounds, and the table shows medians: on a
small machine other work moves single rows by 10 %, and it should move both sides alike.

Every sentence is 16 tokens long ([CLS] + 14 words + [SEP]).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL = "all-minilm-l6-v2"
WORDS = [
    "river",
    "mountain",
    "quiet",
    "engine",
    "paper",
    "window",
    "garden",
    "music",
    "yellow",
    "thunder",
    "silver",
    "bread",
    "lamp",
    "forest",
    "ocean",
    "clock",
    "market",
    "winter",
    "pencil",
    "harbor",
    "valley",
    "bridge",
    "stone",
    "candle",
    "meadow",
    "rocket",
    "violin",
    "tiger",
    "cloud",
    "orange",
]


def sentences(tokenizer: Any, count: int, tokens: int = 16) -> list[str]:
    """Distinct sentences that each tokenise to exactly ``tokens`` tokens."""
    tokenizer.no_padding()  # tokenizer.json may pad everything to a fixed length
    tokenizer.no_truncation()
    rng = random.Random(0)
    out: list[str] = []
    while len(out) < count:
        text = " ".join(rng.choice(WORDS) for _ in range(tokens - 2))
        if len(tokenizer.encode(text).ids) == tokens:
            out.append(text)
    return out


def prepare_model(cache_dir: Path) -> Path:
    from modelyard import demo

    return demo.prepare(MODEL, cache_dir, lambda phase, pct: print(f"  {phase}", file=sys.stderr))


# -- bare onnxruntime ----------------------------------------------------------------------


def bare_call(model_dir: Path, *, spin: bool) -> Any:
    """``call(texts)``: tokenise + run + mean-pool + normalise, the least a direct user does;
    it returns the vectors as lists of floats (what a server would put in its answer).

    ``spin``: onnxruntime's default busy-waiting worker threads; the backend turns it off.
    """
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(256)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    session = ort.InferenceSession(
        str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"]
    )

    def call(chunk: list[str]) -> list[list[float]]:
        encodings = tokenizer.encode_batch(chunk)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        (hidden,) = session.run(["last_hidden_state"], feeds)
        weights = mask[:, :, None].astype(np.float32)
        vectors = (hidden * weights).sum(1) / weights.sum(1)
        rows: list[list[float]] = (
            vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        ).tolist()
        return rows

    return call


#: onnxruntime's default (busy-waiting worker threads) and what the backend runs.
BARE_VARIANTS = (("bare", True), ("bare-nospin", False))


def bare(call: Any, texts: list[str], batch: int, seconds: float) -> tuple[float, float]:
    """Sentences/s and median call latency (ms) at ``batch``."""
    for i in range(3):
        call(texts[i * batch : (i + 1) * batch])
    latencies, done, i = [], 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        t = time.perf_counter()
        call(chunk)
        latencies.append(time.perf_counter() - t)
        done += batch
        i += batch
    elapsed = time.perf_counter() - start
    return done / elapsed, statistics.median(latencies) * 1000


# -- the server ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    model_dir: Path, workdir: Path, batching: dict[str, Any], options: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    lines = [
        "[[models]]",
        f'name = "{MODEL}"',
        'backend = "onnx"',
        f'source = "{model_dir}"',
        'task = "embeddings"',
        "[models.batching]",
        *(f"{k} = {_toml(v)}" for k, v in batching.items()),
        "[models.options]",
        *(f"{k} = {_toml(v)}" for k, v in options.items()),
    ]
    config = workdir / "bench.toml"
    config.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "MODELYARD_PLUGINS": "onnx"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "modelyard",
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc, port


def _toml(value: Any) -> str:
    """A TOML value: JSON's scalars and arrays are TOML; tables become inline tables."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def server_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Connection:
    """One keep-alive HTTP/1.1 connection: a request out, a Content-Length response back."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int
    ) -> None:
        self.reader, self.writer, self.port = reader, writer, port

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, port)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.writer.write(head.encode() + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), payload

    def close(self) -> None:
        self.writer.close()


async def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            conn = await Connection.open(port)
            status, _ = await conn.request("GET", "/v2/health/ready")
            conn.close()
            if status == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError("server never became ready")


async def served(port: int, texts: list[str], concurrency: int, seconds: float) -> dict[str, float]:
    bodies = [json.dumps({"model": MODEL, "input": t}).encode() for t in texts]
    conns = [await Connection.open(port) for _ in range(concurrency)]
    for conn in conns:  # warm each connection
        await conn.request("POST", "/v1/embeddings", bodies[0])
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds
    errors = 0

    async def worker(k: int, conn: Connection) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            status, _ = await conn.request("POST", "/v1/embeddings", bodies[i % len(bodies)])
            latencies.append(time.perf_counter() - t)
            errors += status != 200
            i += concurrency

    cpu, start = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(k, c) for k, c in enumerate(conns)))
    elapsed = time.perf_counter() - start
    for conn in conns:
        conn.close()
    return {
        "rate": len(latencies) / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1000,
        "client_cpu": time.process_time() - cpu,
        "errors": errors,
        "elapsed": elapsed,
    }


async def lone_pairs(
    ports: dict[str, int], call: Any, texts: list[str], seconds: float
) -> dict[str, list[float]]:
    """Before every request one bare call, so each request meets the same background load and
    finds its server idle for the same time; the servers take turns, in a new order every
    round (a fixed order let one server's after-work land on the next one's bare call).

    For each server (name -> port): the p50 of bare, of served, and of their per-pair
    difference (ms).
    """
    conns = {name: await Connection.open(port) for name, port in ports.items()}
    bodies = [json.dumps({"model": MODEL, "input": t}).encode() for t in texts]
    bare_ms: dict[str, list[float]] = {name: [] for name in ports}
    served_ms: dict[str, list[float]] = {name: [] for name in ports}
    stop_at = time.perf_counter() + seconds * len(ports)
    i = 0
    order = list(conns.items())
    shuffle = random.Random(0).shuffle
    while time.perf_counter() < stop_at or i < 20:
        shuffle(order)
        for name, conn in order:
            t = time.perf_counter()
            call([texts[i % len(texts)]])
            bare_ms[name].append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            status, _ = await conn.request("POST", "/v1/embeddings", bodies[i % len(bodies)])
            served_ms[name].append((time.perf_counter() - t) * 1000)
            if status != 200:
                raise RuntimeError(f"{name} answered {status}")
        i += 1
    for conn in conns.values():
        conn.close()
    out = {}
    for name in ports:
        diffs = [s - b for s, b in zip(served_ms[name], bare_ms[name], strict=True)]
        out[name] = [statistics.median(x) for x in (bare_ms[name], served_ms[name], diffs)]
    return out


def start_floor_server(model_dir: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    """bench/floor_server.py on the same uvicorn: the floor, or with ``model_dir`` the
    reference (the bare call on a thread of its own)."""
    port = _free_port()
    model = [] if model_dir is None else ["--model", str(model_dir)]
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("floor_server.py")), str(port), *model],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return proc, port


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per row")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the demo model is prepared (default: modelyard's cache)",
    )
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    parser.add_argument("--max-batch-size", type=int, default=None)
    parser.add_argument(
        "--options",
        type=json.loads,
        default={},
        help="model options as JSON, e.g. '{\"concurrent_runs\": 2}'",
    )
    args = parser.parse_args()

    from tokenizers import Tokenizer

    from modelyard.core.settings import cache_dir_of, decode_settings

    cache = args.cache_dir or cache_dir_of(decode_settings({}, env={}))
    model_dir = prepare_model(cache)
    texts = sentences(Tokenizer.from_file(str(model_dir / "tokenizer.json")), 512)
    print(f"model: {model_dir}  cores: {os.cpu_count()}  sentence: 16 tokens", flush=True)

    batching: dict[str, Any] = {"max_queue_delay_ms": args.max_queue_delay_ms}
    if args.max_batch_size:
        batching["max_batch_size"] = args.max_batch_size
    # Every row runs once per round, bare and served side by side, so that whatever else the
    # machine does falls on both alike; the table shows each row's median over the rounds.
    bare_runs: dict[tuple[str, int], list[tuple[float, float]]] = {}
    served_runs: dict[int, list[dict[str, float]]] = {}
    calls = {label: bare_call(model_dir, spin=spin) for label, spin in BARE_VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_server(model_dir, Path(tmp), batching, args.options)
        floor_proc, floor_port = start_floor_server()
        reference_proc, reference_port = start_floor_server(model_dir)
        try:
            asyncio.run(wait_ready(port, proc))
            asyncio.run(wait_ready(floor_port, floor_proc))
            asyncio.run(wait_ready(reference_port, reference_proc))
            for _ in range(args.repeats):
                for n in (1, 8, 32):
                    for label, _spin in BARE_VARIANTS:
                        run = bare(calls[label], texts, n, args.seconds)
                        bare_runs.setdefault((label, n), []).append(run)
                    cpu0 = server_cpu_s(proc.pid)
                    row = asyncio.run(served(port, texts, n, args.seconds))
                    row["server_cpu"] = server_cpu_s(proc.pid) - cpu0
                    served_runs.setdefault(n, []).append(row)
            pairs = asyncio.run(
                lone_pairs(
                    {"modelyard": port, "floor": floor_port, "reference": reference_port},
                    calls["bare-nospin"],
                    texts,
                    args.seconds,
                )
            )
        finally:
            for p in (proc, floor_proc, reference_proc):
                p.terminate()
                p.wait(timeout=30)

    bare_rows = {key: _median_pair(runs) for key, runs in bare_runs.items()}
    served_rows = {n: _median_row(runs) for n, runs in served_runs.items()}
    print(f"\nmedians of {args.repeats} interleaved rounds, {args.seconds:g} s each")
    header = ("", "n", "sent/s", "p50 ms", "p99 ms", "client cpu s", "server cpu s", "errors")
    print("{:>12} {:>3} {:>9} {:>8} {:>8} {:>13} {:>13} {:>7}".format(*header))
    for (label, b), (rate, p50) in sorted(bare_rows.items(), key=lambda kv: kv[0][1]):
        print(f"{label:>12} {b:>3} {rate:>9.1f} {p50:>8.2f}")
    for c, row in served_rows.items():
        print(
            f"{'served':>12} {c:>3} {row['rate']:>9.1f} {row['p50']:>8.2f} {row['p99']:>8.2f} "
            f"{row['client_cpu']:>13.2f} {row['server_cpu']:>13.2f} {int(row['errors']):>7}"
        )

    def best(b: int) -> tuple[float, float]:
        """The better bare variant: throughput is compared against the stronger baseline."""
        rows = [bare_rows[(label, b)] for label, _ in BARE_VARIANTS]
        return max(r[0] for r in rows), min(r[1] for r in rows)

    ratio = served_rows[32]["rate"] / best(32)[0]
    paired, floor, reference = pairs["modelyard"], pairs["floor"], pairs["reference"]
    lone = paired[2]
    verdict = "ok" if ratio >= 0.85 else "MISSED"
    print(f"\nserved c32 / best bare b32: {ratio:.2f}x (target >= 0.85)  {verdict}")
    print(f"served c8 / best bare b8:   {served_rows[8]['rate'] / best(8)[0]:.2f}x")
    print(f"served c1 / best bare b1:   {served_rows[1]['rate'] / best(1)[0]:.2f}x")
    print(
        f"lone request, paired with a bare b1 call each time: served p50 {paired[1]:.2f} ms, "
        f"bare p50 {paired[0]:.2f} ms, p50 of (served - bare) {lone:+.2f} ms "
        f"(target <= +2 ms)  {'ok' if lone <= 2.0 else 'MISSED'}"
    )
    print(
        f"floor, an empty Litestar app on the same uvicorn (no model), paired the same way: "
        f"round trip p50 {floor[1]:.2f} ms (bare p50 {floor[0]:.2f} ms); "
        f"modelyard's own share of the lone overhead: {lone - floor[1]:+.2f} ms"
    )
    print(
        f"reference, the same app running the bare call on a thread of its own, paired the "
        f"same way: p50 of (served - bare) {reference[2]:+.2f} ms "
        f"({'within' if reference[2] <= 2.0 else 'over'} the +2 ms target on its own); "
        f"modelyard over the reference: {lone - reference[2]:+.2f} ms"
    )
    c32 = served_rows[32]
    per_request_us = c32["client_cpu"] / max(1.0, c32["rate"] * c32["elapsed"]) * 1e6
    print(f"client CPU per request at c32: {per_request_us:.0f} us")
    print(
        f"load average at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews rows)"
    )


def _median_pair(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def _median_row(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


if __name__ == "__main__":
    main()
