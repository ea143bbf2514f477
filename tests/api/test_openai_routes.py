"""OpenAI-compatible routes against the echo backend: bodies, usage, headers, SSE framing."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import pytest

from modelyard.api.app import create_app
from modelyard.core.plugins import PluginHost
from modelyard.testing import plugin as fake_plugin
from modelyard.testing.backends import fake_embedding


def _model(
    name: str, backend: str = "echo", task: str | None = "chat", **extra: Any
) -> dict[str, Any]:
    return {"name": name, "backend": backend, "source": ".", "task": task, **extra}


@pytest.fixture
async def api(start_api: Any) -> Any:
    return await start_api(
        _model("echo", version="3"),
        _model("echo-embed", task="embeddings", options={"dim": 6}),
        _model("echo-cls", task="classification", options={"labels": ["neg", "pos", "meh"]}),
        _model("broken", backend="failing", options={"fail_on_load": True}, required=False),
        _model("tensor", task="tensor"),
    )


def _chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "echo", "messages": [{"role": "user", "content": text}], **extra}


def _events(raw: str) -> list[str]:
    """Split an SSE body, checking that every event is exactly ``data: <payload>\\n\\n``."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    for event in events:
        assert event.startswith("data: "), event
        assert "\n" not in event, f"multi-line event: {event!r}"
    return [e[len("data: ") :] for e in events]


async def test_models_lists_only_serving_models(api: Any) -> None:
    response = await api.client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    listed = {m["id"]: m for m in body["data"]}
    assert set(listed) == {"echo", "echo-embed", "echo-cls", "tensor"}  # not "broken"
    assert listed["echo"]["object"] == "model"
    assert listed["echo"]["owned_by"] == "modelyard"
    assert listed["echo"]["version"] == "3"
    assert listed["echo-embed"]["task"] == "embeddings"

    await api.service.unload_model("echo")
    after = (await api.client.get("/v1/models")).json()
    assert "echo" not in {m["id"] for m in after["data"]}


async def test_chat_completion_body_usage_and_version_header(api: Any) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        json={
            "model": "echo",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "the quick brown fox"},
            ],
        },
    )
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "3"
    assert response.headers["x-model-name"] == "echo"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "echo"
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "the quick brown fox"}
    assert choice["finish_reason"] == "stop"
    # Echo counts words: the prompt is every message, the completion the last one.
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}


async def test_max_tokens_cuts_with_finish_reason_length(api: Any) -> None:
    body = (
        await api.client.post(
            "/v1/chat/completions", json=_chat("one two three four", max_tokens=2)
        )
    ).json()
    assert body["choices"][0]["message"]["content"] == "one two"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2

    newer = (
        await api.client.post(
            "/v1/chat/completions", json=_chat("one two three", max_completion_tokens=1)
        )
    ).json()
    assert newer["choices"][0]["message"]["content"] == "one"


@pytest.mark.parametrize("stop", ["three", ["nothing", "three"]])
async def test_stop_sequences_end_the_text(api: Any, stop: Any) -> None:
    body = (
        await api.client.post("/v1/chat/completions", json=_chat("one two three four", stop=stop))
    ).json()
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "stop"


async def test_chat_accepts_text_content_parts(api: Any) -> None:
    body = (
        await api.client.post(
            "/v1/chat/completions",
            json={
                "model": "echo",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "hello "},
                            {"type": "text", "text": "parts"},
                        ],
                    }
                ],
            },
        )
    ).json()
    assert body["choices"][0]["message"]["content"] == "hello parts"


async def test_completions_with_a_list_of_prompts(api: Any) -> None:
    response = await api.client.post(
        "/v1/completions",
        json={
            "model": "echo",
            "prompt": ["alpha beta", "gamma delta epsilon", "zeta"],
            "max_tokens": 2,
        },
    )
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "3"
    body = response.json()
    assert body["object"] == "text_completion"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "alpha beta", "stop"),
        (1, "gamma delta", "length"),
        (2, "zeta", "stop"),
    ]
    assert body["usage"] == {"prompt_tokens": 6, "completion_tokens": 5, "total_tokens": 11}


async def test_completions_echo_prepends_the_prompt(api: Any) -> None:
    body = (
        await api.client.post(
            "/v1/completions",
            json={
                "model": "echo",
                "prompt": "say",
                "echo": True,
            },
        )
    ).json()
    assert body["choices"][0]["text"] == "saysay"


async def test_embeddings_as_floats(api: Any) -> None:
    response = await api.client.post(
        "/v1/embeddings",
        json={
            "model": "echo-embed",
            "input": ["first text", "second"],
        },
    )
    assert response.status_code == 200
    assert response.headers["x-model-version"] == "1"
    body = response.json()
    assert body["object"] == "list"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["object"] == "embedding"
    assert body["data"][0]["embedding"] == pytest.approx(fake_embedding("first text", 6))
    assert body["data"][1]["embedding"] == pytest.approx(fake_embedding("second", 6))
    assert body["usage"]["prompt_tokens"] == 3


async def test_embeddings_as_base64_decode_to_the_same_floats(api: Any) -> None:
    floats = (
        await api.client.post(
            "/v1/embeddings",
            json={
                "model": "echo-embed",
                "input": "some text",
            },
        )
    ).json()["data"][0]["embedding"]
    encoded = (
        await api.client.post(
            "/v1/embeddings",
            json={
                "model": "echo-embed",
                "input": "some text",
                "encoding_format": "base64",
            },
        )
    ).json()["data"][0]["embedding"]

    assert isinstance(encoded, str)
    raw = base64.b64decode(encoded)
    assert len(raw) == 4 * 6
    decoded = list(struct.unpack("<6f", raw))
    assert decoded == pytest.approx(floats, rel=1e-6)


async def test_embeddings_dimensions_must_match_the_model(api: Any, problem: Any) -> None:
    ok = await api.client.post(
        "/v1/embeddings",
        json={
            "model": "echo-embed",
            "input": "x",
            "dimensions": 6,
        },
    )
    assert ok.status_code == 200
    wrong = await api.client.post(
        "/v1/embeddings",
        json={
            "model": "echo-embed",
            "input": "x",
            "dimensions": 7,
        },
    )
    assert problem(wrong, 400)["detail"] == "model 'echo-embed' has 6 dimensions, not 7"


async def test_embeddings_of_token_ids_are_refused(api: Any, problem: Any) -> None:
    response = await api.client.post(
        "/v1/embeddings", json={"model": "echo-embed", "input": [[1, 2]]}
    )
    assert "token-id arrays are not supported" in problem(response, 400)["detail"]


async def test_classify(api: Any) -> None:
    response = await api.client.post(
        "/v1/classify",
        json={
            "model": "echo-cls",
            "input": ["ab", "abc"],
            "top_k": 2,
        },
    )
    assert response.status_code == 200
    assert response.headers["x-model-name"] == "echo-cls"
    body = response.json()
    assert body["object"] == "list"
    # Echo ranks labels[len(text) % 3] first with 0.9.
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["labels"][0] == {"label": "meh", "score": 0.9}
    assert body["data"][1]["labels"][0] == {"label": "neg", "score": 0.9}
    assert all(len(d["labels"]) == 2 for d in body["data"])


@pytest.mark.parametrize("top_k", [-5, 0])
async def test_classify_top_k_must_be_a_positive_count(
    api: Any, problem: Any, top_k: int
) -> None:
    response = await api.client.post(
        "/v1/classify", json={"model": "echo-cls", "input": "ab", "top_k": top_k}
    )
    assert "top_k" in problem(response, 400)["detail"]


# -- streaming -----------------------------------------------------------------------------------


async def test_chat_stream_framing(api: Any) -> None:
    response = await api.client.post(
        "/v1/chat/completions", json=_chat("one two three", stream=True)
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-model-version"] == "3"
    events = _events(response.text)

    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "echo" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "one two three"
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in chunks[-1]


async def test_chat_stream_include_usage_adds_a_usage_chunk(api: Any) -> None:
    response = await api.client.post(
        "/v1/chat/completions",
        json=_chat(
            "one two three",
            stream=True,
            max_tokens=2,
            stream_options={"include_usage": True},
        ),
    )
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    last_content = chunks[-2]
    assert last_content["choices"][0]["finish_reason"] == "length"


async def test_completion_stream_framing(api: Any) -> None:
    response = await api.client.post(
        "/v1/completions",
        json={
            "model": "echo",
            "prompt": "a b c",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    events = _events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "a b c"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_a_stream_of_several_prompts_is_refused(api: Any, problem: Any) -> None:
    response = await api.client.post(
        "/v1/completions",
        json={
            "model": "echo",
            "prompt": ["a", "b"],
            "stream": True,
        },
    )
    assert problem(response, 400)["detail"] == "streaming takes a single prompt"


async def test_plugins_route_lists_the_fakes(api: Any) -> None:
    body = (await api.client.get("/v1/plugins")).json()
    [record] = body["plugins"]
    assert record["name"] == "testing"
    assert record["status"] == "loaded"
    assert {"echo", "failing", "hanging"} <= set(record["backends"])


async def test_plugins_route_shows_an_allow_listed_plugin_that_is_missing(
    make_settings: Any,
) -> None:
    host = PluginHost(allow={"sources", "nosuchplugin"})
    host.load_entry_points()
    host.register(fake_plugin, name="testing", source="modelyard.testing")
    app = create_app(make_settings(), plugins=host)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        records = {r["name"]: r for r in (await client.get("/v1/plugins")).json()["plugins"]}
    assert records["sources"]["status"] == "loaded"
    assert records["nosuchplugin"]["status"] == "missing"
    assert "nosuchplugin" in records["nosuchplugin"]["error"]
