"""The official ``openai`` SDK against a real uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from modelyard.testing import LiveServer
from modelyard.testing.backends import fake_embedding


@pytest.fixture(scope="module")
def client(live_echo: LiveServer) -> Iterator[openai.OpenAI]:
    # A short timeout: a hung request must fail this test, not stall the suite for 10 minutes.
    with openai.OpenAI(
        base_url=f"{live_echo.url}/v1", api_key="unused", max_retries=0, timeout=30
    ) as c:
        yield c


def test_models_list(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert ids == {"echo", "echo-embed", "doubler"}


def test_chat_completion(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hello from the sdk"}], max_tokens=3,
    )
    assert raw.headers["x-model-version"] == "1"
    completion = raw.parse()
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == "hello from the"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (4, 3)


def test_chat_completion_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streamed words arrive"}],
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed words arrive"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_completions(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="echo", prompt=["one two", "three"], max_tokens=5)
    assert [c.text for c in completion.choices] == ["one two", "three"]
    assert completion.usage is not None and completion.usage.total_tokens == 6


def test_embeddings_default_base64_path(client: openai.OpenAI) -> None:
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    response = client.embeddings.create(model="echo-embed", input=["alpha", "beta gamma"])
    assert [d.index for d in response.data] == [0, 1]
    for item, text in zip(response.data, ["alpha", "beta gamma"], strict=True):
        assert list(item.embedding) == pytest.approx(fake_embedding(text, 16), rel=1e-6)
    assert response.usage.prompt_tokens == 3


def test_embeddings_as_floats(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="echo-embed", input="alpha", encoding_format="float")
    assert list(response.data[0].embedding) == pytest.approx(fake_embedding("alpha", 16))


def test_an_unknown_model_is_an_api_status_error_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert isinstance(caught.value, openai.NotFoundError)
    assert caught.value.body == {"message": "model 'nope' does not exist",
                                 "type": "model-not-found", "code": 404}


def test_a_task_mismatch_is_a_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="echo", input="x")
    assert "serves chat, not embeddings" in str(caught.value)
