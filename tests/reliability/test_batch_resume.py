"""SIGKILL a server in the middle of a batch, start it again: the job resumes where it was.

``modelyard serve`` runs as a subprocess on 127.0.0.1 with a ``slow`` fake backend; it is
killed with SIGKILL once some lines are checkpointed, then restarted on the same data
directory. The output then holds every line exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from modelyard.testing import wait_until

#: A subprocess server: poll less often, wait longer.
POLL = {"timeout": 60.0, "interval": 0.05}

LINES = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(f"""
cache_dir = "{tmp_path / 'cache'}"
[batches]
max_in_flight_per_model = 2
[[models]]
name = "slow"
backend = "slow"
source = "."
task = "chat"
options = {{ delay_s = 0.05, max_batch_size = 1 }}
""")
    return path


@pytest.fixture
def serve(config: Path) -> Iterator[Callable[[int], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "modelyard", "serve", "--config", str(config),
             "--port", str(port), "--log-level", "warning"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)


def test_sigkill_mid_job_resumes_without_duplicates_or_losses(
    serve: Callable[[int], subprocess.Popen[bytes]],
) -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    first = serve(port)
    wait_until(lambda: _up(url), "the first server", **POLL)
    lines = [{"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "slow", "messages": [{"role": "user", "content": f"n {i}"}]}}
             for i in range(LINES)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    with httpx.Client(base_url=url, timeout=10) as client:
        upload = client.post("/v1/files", files={"file": ("in.jsonl", content)},
                             data={"purpose": "batch"})
        assert upload.status_code == 200, upload.text
        created = client.post("/v1/batches", json={
            "input_file_id": upload.json()["id"], "endpoint": "/v1/chat/completions",
            "completion_window": "24h"})
        assert created.status_code == 200, created.text
        batch_id = created.json()["id"]

        def answered() -> int:
            return int(client.get(f"/v1/batches/{batch_id}").json()
                       ["request_counts"]["completed"])

        wait_until(lambda: answered() >= 5, "some lines to be checkpointed", **POLL)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)

    serve(port)
    wait_until(lambda: _up(url), "the restarted server", **POLL)
    with httpx.Client(base_url=url, timeout=10) as client:
        before = client.get(f"/v1/batches/{batch_id}").json()
        assert before["request_counts"]["completed"] < LINES, "the job finished before the kill"
        wait_until(
            lambda: client.get(f"/v1/batches/{batch_id}").json()["status"] == "completed",
            "the resumed job to complete", **POLL,
        )
        batch = client.get(f"/v1/batches/{batch_id}").json()
        assert batch["request_counts"] == {"total": LINES, "completed": LINES, "failed": 0}
        output = client.get(f"/v1/files/{batch['output_file_id']}/content").text.splitlines()
    ids = [json.loads(line)["custom_id"] for line in output]
    assert len(ids) == LINES
    assert sorted(ids) == sorted(f"line-{i}" for i in range(LINES))
