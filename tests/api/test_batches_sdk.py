"""The official ``openai`` SDK against the Files and Batch API, in process over ASGI.

Upload, create, poll to ``completed``, read the output: every line's body matches what the
live endpoint answers for the same body (ids and timestamps aside).
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from conftest import Api, StartApi

ECHO = {"name": "echo", "backend": "echo", "source": ".", "task": "chat"}
EMBED = {"name": "embed", "backend": "echo", "source": ".", "task": "embeddings"}
BROKEN = {"name": "broken", "backend": "failing", "source": ".", "task": "chat"}
TEXT = {"name": "text", "backend": "echo", "source": ".", "task": "completion"}
VOLATILE = {"id", "created", "request_id", "instance"}


@pytest.fixture
async def api(start_api: StartApi, tmp_path: Path) -> Api:
    result: Api = await start_api(
        ECHO, EMBED, TEXT, BROKEN, cache_dir=str(tmp_path), batches={"retry_backoff_s": 0}
    )
    return result


@pytest.fixture
async def sdk(api: Api) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=api.app),
                             base_url="http://testserver")
    async with openai.AsyncOpenAI(base_url="http://testserver/v1", api_key="unused",
                                  http_client=http, max_retries=0) as client:
        yield client


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _line(i: int, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}


def _stable(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: _stable(v) for k, v in body.items() if k not in VOLATILE}
    if isinstance(body, list):
        return [_stable(v) for v in body]
    return body


async def _until_finished(sdk: openai.AsyncOpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 30
    while True:
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        assert time.monotonic() < deadline, f"batch stuck in {batch.status}"
        await asyncio.sleep(0.01)


async def _run_batch(
    sdk: openai.AsyncOpenAI, url: str, bodies: list[dict[str, Any]]
) -> tuple[Any, list[dict[str, Any]]]:
    upload = await sdk.files.create(
        file=("in.jsonl", io.BytesIO(_jsonl([_line(i, url, b) for i, b in enumerate(bodies)]))),
        purpose="batch",
    )
    assert upload.purpose == "batch" and upload.bytes > 0
    created = await sdk.batches.create(
        input_file_id=upload.id, endpoint=url, completion_window="24h",  # type: ignore[arg-type]
        metadata={"job": "test"},
    )
    assert created.status == "validating"
    assert created.request_counts is not None and created.request_counts.total == len(bodies)
    batch = await _until_finished(sdk, created.id)
    assert batch.output_file_id is not None
    content = await sdk.files.content(batch.output_file_id)
    return batch, [json.loads(line) for line in content.text.splitlines()]


@pytest.mark.parametrize(
    ("url", "bodies"),
    [
        ("/v1/chat/completions", [
            {"model": "echo", "messages": [{"role": "user", "content": f"say {i} words"}],
             "max_tokens": 2} for i in range(5)]),
        ("/v1/completions", [{"model": "text", "prompt": f"one two {i}"} for i in range(5)]),
        ("/v1/embeddings", [{"model": "embed", "input": [f"text {i}", "more"]}
                            for i in range(5)]),
    ],
)
async def test_sdk_batch_output_matches_the_live_endpoint(
    api: Api, sdk: openai.AsyncOpenAI, url: str, bodies: list[dict[str, Any]]
) -> None:
    batch, lines = await _run_batch(sdk, url, bodies)
    assert batch.status == "completed"
    assert batch.request_counts.completed == len(bodies) and batch.request_counts.failed == 0
    assert batch.error_file_id is None and batch.metadata == {"job": "test"}
    assert [line["custom_id"] for line in lines] == [f"req-{i}" for i in range(len(bodies))]
    for line, body in zip(lines, bodies, strict=True):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        live = await api.client.post(url, json=body)
        assert live.status_code == 200
        assert _stable(line["response"]["body"]) == _stable(live.json())


async def test_sdk_lists_retrieves_and_deletes(sdk: openai.AsyncOpenAI) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    batch, _ = await _run_batch(sdk, "/v1/chat/completions", [body])
    listed = [b.id async for b in sdk.batches.list()]
    assert listed == [batch.id]
    files = {f.id: f.purpose async for f in sdk.files.list()}
    assert files[batch.input_file_id] == "batch"
    assert files[batch.output_file_id] == "batch_output"
    deleted = await sdk.files.delete(batch.input_file_id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await sdk.files.retrieve(batch.input_file_id)


async def test_a_failing_line_is_retried_then_goes_to_the_error_file(
    sdk: openai.AsyncOpenAI,
) -> None:
    good = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    bad = {"model": "broken", "messages": [{"role": "user", "content": "x"}]}
    upload = await sdk.files.create(
        file=("in.jsonl", io.BytesIO(_jsonl([_line(0, "/v1/chat/completions", good),
                                             _line(1, "/v1/chat/completions", bad)]))),
        purpose="batch",
    )
    created = await sdk.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    batch = await _until_finished(sdk, created.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (1, 1)
    assert batch.error_file_id is not None
    errors = (await sdk.files.content(batch.error_file_id)).text.splitlines()
    line = json.loads(errors[0])
    assert line["custom_id"] == "req-1"
    assert line["response"]["status_code"] >= 500
    problem = line["response"]["body"]
    assert problem["status"] == line["response"]["status_code"] and problem["detail"]
    assert "Traceback" not in errors[0]
