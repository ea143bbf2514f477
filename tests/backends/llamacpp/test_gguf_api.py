"""The gguf backend behind the HTTP API: SSE framing, the openai SDK, disconnects, bad files."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from gguf_testing import MakeGGUF

from modelyard.api.app import create_app
from modelyard.backends import llamacpp
from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings
from modelyard.testing import LiveServer, run_live_server

EVIL = "{{ ''.__class__.__mro__[1].__subclasses__() }}{{ messages[0].content }}"


@pytest.fixture(scope="module")
def gguf_host() -> Iterator[PluginHost]:
    host = PluginHost(allow=())
    assert host.register(llamacpp, name="gguf", source="modelyard")
    yield host
    host.unregister("gguf")


@pytest.fixture(scope="module")
def models(make_gguf: MakeGGUF, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tiny = make_gguf("tiny-chatml")
    cut = tmp_path_factory.mktemp("cut") / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[: tiny.stat().st_size // 2])
    options = {"n_threads": 1, "n_ctx": 256}
    return [
        {
            "name": "tiny",
            "backend": "gguf",
            "source": str(tiny),
            "options": {**options, "parallel": 2},
        },
        # One slot, no queue, and a context long enough that a stream outlives any test.
        {
            "name": "solo",
            "backend": "gguf",
            "source": str(make_gguf("tiny-long", context_length=32768)),
            "options": {"n_threads": 1, "n_ctx": 32768, "parallel": 1, "max_queue": 0},
        },
        {
            "name": "evil",
            "backend": "gguf",
            "source": str(make_gguf("tiny-evil-api", chat_template=EVIL)),
            "options": options,
        },
        {"name": "cut", "backend": "gguf", "source": str(cut), "required": False},
    ]


@pytest.fixture(scope="module")
def server(gguf_host: PluginHost, models: list[dict[str, Any]]) -> Iterator[LiveServer]:
    settings = decode_settings({"models": models}, env={})
    with run_live_server(create_app(settings, plugins=gguf_host)) as live:
        deadline = time.monotonic() + 60
        # Bounded poll of the public probe: the models load in the server's own loop.
        while httpx.get(f"{live.url}/v2/health/ready").status_code != 200:
            assert time.monotonic() < deadline, "models never became ready"
            time.sleep(0.02)
        yield live


@pytest.fixture
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


def test_completion_stream_is_sse_ending_in_done(server: LiveServer) -> None:
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 12, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    streamed = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    frames = [json.loads(e) for e in events[:-1]]
    choices = [f["choices"][0] for f in frames if f["choices"]]
    assert [c["finish_reason"] for c in choices[:-1]] == [None] * (len(choices) - 1)
    assert choices[-1]["finish_reason"] == "length"
    assert frames[-1]["usage"]["completion_tokens"] == 12
    whole = httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=30)
    assert "".join(c["text"] for c in choices) == whole.json()["choices"][0]["text"]


def test_openai_sdk_chat_streams_token_by_token(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hello"}]
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for d in deltas if d) > 1  # more than one piece: streamed, not buffered
    whole = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=10, temperature=0
    )
    assert "".join(deltas) == whole.choices[0].message.content
    assert whole.usage is not None and whole.usage.completion_tokens == 10


def test_openai_sdk_completion_with_stop(client: openai.OpenAI) -> None:
    full = client.completions.create(model="tiny", prompt="the cat", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[6:9]
    cut = client.completions.create(model="tiny", prompt="the cat", max_tokens=16, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_a_disconnected_stream_frees_its_slot(server: LiveServer) -> None:
    body = {"model": "solo", "prompt": "hello", "max_tokens": 30_000, "stream": True}

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                # Keep the iterator referenced: dropping it would close the connection early.
                lines = response.aiter_lines()
                async for line in lines:
                    if line.startswith("data: "):
                        break  # first token arrived: the only slot is taken
                busy = await http.post("/v1/completions", json={**body, "stream": False})
                assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            # The client went away mid-stream; the slot must come back without a restart.
            deadline = time.monotonic() + 10
            while True:
                again = await http.post("/v1/completions", json={**body, "max_tokens": 2,
                                                                 "stream": False})
                if again.status_code == 200:
                    break
                assert again.status_code == 503
                assert time.monotonic() < deadline, "the abandoned stream kept its slot"
                await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_a_template_reaching_for_python_internals_is_refused(
    client: openai.OpenAI, server: LiveServer
) -> None:
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "evil", "messages": [{"role": "user", "content": "hi"}]}, timeout=30,
    )
    assert response.status_code == 500
    detail = response.json()["detail"]  # a 5xx: a stable text, the sandbox's words in the log
    assert detail.startswith("model 'evil' failed to answer") and "<class" not in detail
    assert client.completions.create(model="evil", prompt="hi", max_tokens=3).choices[0].text


def test_a_truncated_file_fails_its_version_while_others_serve(
    server: LiveServer, client: openai.OpenAI
) -> None:
    state = httpx.get(f"{server.url}/admin/models").json()
    cut = next(m for m in state["models"] if m["name"] == "cut")["versions"][0]
    assert cut["state"] == "failed"
    assert "truncated GGUF file cut.gguf" in cut["error"]
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).choices[0].text


def test_model_metadata_reports_the_device(server: LiveServer) -> None:
    meta = httpx.get(f"{server.url}/v2/models/tiny").json()
    assert meta["platform"] == "llama.cpp"
    assert meta["parameters"]["device"] == "CPU"
    assert meta["parameters"]["slots"] == 2
    assert meta["parameters"]["quantization"] == "ALL_F32"
