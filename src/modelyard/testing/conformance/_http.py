"""A backend served by a real server, asked through the official ``openai`` and ``tritonclient``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from modelyard.core.plugins import PluginHost
from modelyard.core.settings import decode_settings
from modelyard.core.types import Task, TensorRequest
from modelyard.testing.conformance._common import ConformanceError
from modelyard.testing.server import LiveServer, run_live_server

__all__ = ["HttpCheck", "check_over_http"]

MODEL = "conformance"


@dataclass(frozen=True)
class HttpCheck:
    """What to serve and what to ask."""

    plugins: PluginHost
    backend: str
    task: Task
    source: Path
    options: Mapping[str, Any]
    cache_dir: Path
    timeout_s: float
    texts: Sequence[str]
    max_tokens: int
    embedding_dim: int | None
    tensor_request: TensorRequest | None


def _create_app() -> Callable[..., Any]:
    # The kit plays a client of the whole server here, as a plugin author's own test would.
    # This is the one import from modelyard.testing into the HTTP layer; the import-linter
    # contract names it as its single exception (pyproject.toml).
    from modelyard.api.app import create_app

    return create_app


def check_over_http(check: HttpCheck) -> None:
    """Serve the model on 127.0.0.1 and ask it through both official clients."""
    with _served(check) as server:
        if check.task in (Task.CHAT, Task.COMPLETION, Task.EMBEDDINGS):
            _ask_openai(server, check)
        _ask_tritonclient(server, check)


@contextlib.contextmanager
def _served(check: HttpCheck) -> Iterator[LiveServer]:
    table = {
        "cache_dir": str(check.cache_dir),
        "server": {"request_timeout_s": check.timeout_s, "log_level": "warning"},
        "models": [{
            "name": MODEL, "backend": check.backend, "source": str(check.source),
            "task": check.task.value, "options": dict(check.options),
        }],
    }
    app = _create_app()(decode_settings(table, env={}), plugins=check.plugins)
    with run_live_server(app, startup_timeout=check.timeout_s) as server:
        _wait_until_ready(server, check.timeout_s)
        yield server


def _wait_until_ready(server: LiveServer, timeout_s: float) -> None:
    """Poll the v2 repository index (bounded) until the model serves or says why it cannot."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=server.url, timeout=timeout_s) as client:
        while True:
            rows = client.get("/v2/repository/index").json()
            row: dict[str, Any] = next((r for r in rows if r.get("name") == MODEL), {})
            if row.get("state") == "READY":
                return
            if row.get("state") == "UNAVAILABLE":
                raise ConformanceError(f"served over HTTP, the model failed to load: {row}")
            if time.monotonic() > deadline:
                raise ConformanceError(
                    f"served over HTTP, the model was not ready within {timeout_s:g} s: {row}"
                )
            time.sleep(0.02)


def _fail(client: str, call: str, exc: Exception) -> ConformanceError:
    return ConformanceError(f"{client}: {call} failed: {type(exc).__name__}: {exc}")


# -- openai ---------------------------------------------------------------------------------


def _ask_openai(server: LiveServer, check: HttpCheck) -> None:
    import openai

    with openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="conformance", max_retries=0,
        timeout=check.timeout_s,
    ) as client:
        try:
            if check.task == Task.EMBEDDINGS:
                _openai_embeddings(client, check)
            elif check.task == Task.CHAT:
                _openai_chat(client, check)
            else:
                _openai_completion(client, check)
        except openai.OpenAIError as exc:
            raise _fail("the openai SDK", f"{check.task.value} request", exc) from None


def _openai_embeddings(client: Any, check: HttpCheck) -> None:
    texts = list(check.texts[:2])
    # Without encoding_format the SDK asks for base64 and decodes it itself.
    for encoding in ({}, {"encoding_format": "float"}):
        response = client.embeddings.create(model=MODEL, input=texts, **encoding)
        rows = [list(item.embedding) for item in response.data]
        if len(rows) != len(texts):
            raise ConformanceError(
                f"the openai SDK got {len(rows)} embeddings for {len(texts)} inputs "
                f"({encoding or 'base64'})"
            )
        if [item.index for item in response.data] != list(range(len(texts))):
            raise ConformanceError("the openai SDK got embeddings out of order")
        dims = {len(row) for row in rows}
        if check.embedding_dim is not None and dims != {check.embedding_dim}:
            raise ConformanceError(
                f"the openai SDK got embeddings of dimension {sorted(dims)}, expected "
                f"{check.embedding_dim}"
            )


def _check_choice(client: str, text: Any, finish: Any, usage: Any, max_tokens: int) -> None:
    if not isinstance(text, str):
        raise ConformanceError(f"{client}: the answer has no text")
    if finish not in ("stop", "length"):
        raise ConformanceError(f"{client}: finish_reason is {finish!r}")
    if usage is None or usage.completion_tokens > max_tokens:
        raise ConformanceError(f"{client}: usage is missing or beyond max_tokens: {usage}")


def _openai_chat(client: Any, check: HttpCheck) -> None:
    messages = [{"role": "user", "content": check.texts[0]}]
    done = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=check.max_tokens, temperature=0
    )
    choice = done.choices[0]
    _check_choice(
        "the openai SDK (chat)", choice.message.content, choice.finish_reason, done.usage,
        check.max_tokens,
    )
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=check.max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    _check_choice(
        "the openai SDK (chat stream)", "", finishes[-1] if finishes else None,
        chunks[-1].usage if chunks else None, check.max_tokens,
    )


def _openai_completion(client: Any, check: HttpCheck) -> None:
    done = client.completions.create(
        model=MODEL, prompt=check.texts[0], max_tokens=check.max_tokens, temperature=0
    )
    choice = done.choices[0]
    _check_choice(
        "the openai SDK (completion)", choice.text, choice.finish_reason, done.usage,
        check.max_tokens,
    )
    chunks = list(client.completions.create(
        model=MODEL, prompt=check.texts[0], max_tokens=check.max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    _check_choice(
        "the openai SDK (completion stream)", "", finishes[-1] if finishes else None,
        chunks[-1].usage if chunks else None, check.max_tokens,
    )


# -- tritonclient ---------------------------------------------------------------------------


def _ask_tritonclient(server: LiveServer, check: HttpCheck) -> None:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(
        url=f"{server.host}:{server.port}", connection_timeout=check.timeout_s,
        network_timeout=check.timeout_s,
    )
    try:
        if not client.is_model_ready(MODEL):
            raise ConformanceError("tritonclient: is_model_ready is false for a loaded model")
        meta = client.get_model_metadata(MODEL)
        if not meta.get("inputs") or not meta.get("outputs"):
            raise ConformanceError(f"tritonclient: model metadata lists no tensors: {meta}")
        if check.task == Task.EMBEDDINGS:
            _triton_embeddings(client, httpclient, check)
        elif check.task == Task.CLASSIFICATION:
            _triton_classification(client, httpclient, check)
        elif check.task == Task.TENSOR:
            _triton_tensor(client, httpclient, check)
        else:
            _triton_generation(client, httpclient, check)
    except InferenceServerException as exc:
        raise _fail("tritonclient", f"v2 infer ({check.task.value})", exc) from None
    finally:
        client.close()


def _texts_input(httpclient: Any, name: str, texts: Sequence[str]) -> Any:
    import numpy as np

    tensor = httpclient.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_))
    return tensor


def _triton_embeddings(client: Any, httpclient: Any, check: HttpCheck) -> None:
    texts = list(check.texts[:2])
    vectors = client.infer(MODEL, [_texts_input(httpclient, "text", texts)]).as_numpy("embedding")
    if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(texts):
        shape = None if vectors is None else list(vectors.shape)
        raise ConformanceError(
            f"tritonclient: 'embedding' has shape {shape} for {len(texts)} texts"
        )
    if check.embedding_dim is not None and vectors.shape[1] != check.embedding_dim:
        raise ConformanceError(
            f"tritonclient: embedding dimension {vectors.shape[1]}, expected {check.embedding_dim}"
        )


def _triton_classification(client: Any, httpclient: Any, check: HttpCheck) -> None:
    texts = list(check.texts[:2])
    result = client.infer(MODEL, [_texts_input(httpclient, "text", texts)])
    for name in ("label", "score"):
        values = result.as_numpy(name)
        if values is None or list(values.shape) != [len(texts)]:
            shape = None if values is None else list(values.shape)
            raise ConformanceError(
                f"tritonclient: {name!r} has shape {shape} for {len(texts)} texts"
            )


def _triton_generation(client: Any, httpclient: Any, check: HttpCheck) -> None:
    result = client.infer(
        MODEL, [_texts_input(httpclient, "text_input", check.texts[:1])],
        parameters={"max_tokens": check.max_tokens, "temperature": 0.0},
    )
    text = result.as_numpy("text_output")
    if text is None or list(text.shape) != [1]:
        raise ConformanceError(f"tritonclient: 'text_output' is {text!r}, not one text")


def _triton_tensor(client: Any, httpclient: Any, check: HttpCheck) -> None:
    import numpy as np
    from tritonclient.utils import triton_to_np_dtype

    request = check.tensor_request
    assert request is not None
    inputs = []
    for tensor in request.inputs:
        dtype = np.object_ if tensor.datatype == "BYTES" else triton_to_np_dtype(tensor.datatype)
        data = np.asarray(tensor.data, dtype=dtype).reshape(tensor.shape)
        item = httpclient.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
        item.set_data_from_numpy(data)
        inputs.append(item)
    result = client.infer(MODEL, inputs)
    outputs = result.get_response().get("outputs") or []
    if not outputs:
        raise ConformanceError("tritonclient: the v2 answer has no outputs")
    for output in outputs:
        if result.as_numpy(output["name"]) is None:
            raise ConformanceError(f"tritonclient: output {output['name']!r} has no data")
