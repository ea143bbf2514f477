"""Every route's error statuses: RFC 9457 problem+json, never a traceback."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from modelyard import hookimpl
from modelyard.core.errors import ModelyardError
from modelyard.core.plugins import PluginHost
from modelyard.testing import HangingBackend

CHAT = {"messages": [{"role": "user", "content": "hello there"}]}
V2_TEXT = {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]}

#: (route, a valid body for a model called ``echo`` serving chat/embeddings/classification)
OPENAI_ROUTES = [
    ("/v1/chat/completions", {"model": "echo", **CHAT}),
    ("/v1/completions", {"model": "echo", "prompt": "hello"}),
    ("/v1/embeddings", {"model": "echo", "input": "hello"}),
    ("/v1/classify", {"model": "echo", "input": "hello"}),
]


def _model(
    name: str, backend: str = "echo", task: str | None = "chat", **extra: Any
) -> dict[str, Any]:
    return {"name": name, "backend": backend, "source": ".", "task": task, **extra}


@pytest.fixture
async def api(start_api: Any) -> Any:
    return await start_api(
        _model("echo"),
        _model("echo-embed", task="embeddings"),
        _model("echo-cls", task="classification"),
        _model("broken", backend="failing", options={"fail_on_load": True}, required=False),
        _model("flaky", backend="failing"),
        server={"max_body_bytes": 1024},
    )


# -- request shape ----------------------------------------------------------------------------


@pytest.mark.parametrize("route", [r for r, _ in OPENAI_ROUTES] + ["/v2/models/echo/infer"])
async def test_malformed_json_is_400(api: Any, problem: Any, route: str) -> None:
    response = await api.client.post(
        route, content=b'{"model": "echo", ', headers={"content-type": "application/json"}
    )
    body = problem(response, 400)
    assert "malformed" in body["detail"].lower()


@pytest.mark.parametrize(
    ("route", "body", "names"),
    [
        ("/v1/chat/completions", {"model": 7, **CHAT}, "model"),
        ("/v1/chat/completions", {"model": "echo", "messages": "hi"}, "messages"),
        ("/v1/completions", {"model": "echo", "prompt": 3}, "prompt"),
        (
            "/v1/embeddings",
            {"model": "echo-embed", "input": "x", "encoding_format": "hex"},
            "encoding_format",
        ),
        ("/v1/classify", {"model": "echo-cls", "input": "x", "top_k": "all"}, "top_k"),
        ("/v2/models/echo/infer", {"inputs": [{"name": "t", "shape": "1"}]}, "inputs"),
    ],
)
async def test_wrong_field_types_are_400_naming_the_field(
    api: Any, problem: Any, route: str, body: dict[str, Any], names: str
) -> None:
    detail = problem(await api.client.post(route, json=body), 400)["detail"]
    assert names in detail


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # Refused by the body's Struct, whose constraints the OpenAPI schema states too.
        ({"model": "echo", "messages": []}, "messages: Expected `array` of length >= 1"),
        ({"model": "echo", **CHAT, "n": 2}, "only n=1 is supported"),
        ({"model": "echo", **CHAT, "temperature": 9}, "temperature: Expected `float` <= 2.0"),
        ({"model": "echo", **CHAT, "logprobs": True}, "logprobs are not supported"),
        (
            {"model": "echo", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type: Invalid enum value 'image_url'",
        ),
    ],
)
async def test_invalid_chat_requests_are_400(
    api: Any, problem: Any, body: dict[str, Any], expected: str
) -> None:
    response = await api.client.post("/v1/chat/completions", json=body)
    assert expected in problem(response, 400)["detail"]


@pytest.mark.parametrize("route", [r for r, _ in OPENAI_ROUTES] + ["/v2/models/echo/infer"])
async def test_an_oversized_body_is_413(api: Any, problem: Any, route: str) -> None:
    response = await api.client.post(
        route,
        content=b'{"x": "' + b"a" * 4096 + b'"}',
        headers={"content-type": "application/json"},
    )
    assert "limit" in problem(response, 413)["detail"]


# -- routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/nope", "/v1/nope", "/v2/nope/deeper"])
async def test_an_unknown_route_is_404(api: Any, problem: Any, path: str) -> None:
    problem(await api.client.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/chat/completions"),
        ("DELETE", "/v1/models"),
        ("PUT", "/v2/health/ready"),
        ("GET", "/v2/models/echo/infer"),
    ],
)
async def test_a_wrong_method_is_405(api: Any, problem: Any, method: str, path: str) -> None:
    problem(await api.client.request(method, path), 405)


# -- models -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("route", "valid"), OPENAI_ROUTES)
async def test_an_unknown_model_is_404(
    api: Any, problem: Any, route: str, valid: dict[str, Any]
) -> None:
    body = problem(await api.client.post(route, json={**valid, "model": "nope"}), 404)
    assert body["detail"] == "model 'nope' does not exist"
    assert body["title"] == "Model Not Found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/nope/infer"),
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/nope/ready"),
        ("POST", "/v2/repository/models/nope/load"),
        ("POST", "/v2/repository/models/nope/unload"),
    ],
)
async def test_an_unknown_model_is_404_on_v2(
    api: Any, problem: Any, method: str, path: str
) -> None:
    response = await api.client.request(method, path, json=V2_TEXT)
    assert problem(response, 404)["detail"] == "model 'nope' does not exist"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v2/models/echo/versions/9/infer"),
        ("GET", "/v2/models/echo/versions/9"),
        ("GET", "/v2/models/echo/versions/9/ready"),
    ],
)
async def test_an_unknown_version_is_404(api: Any, problem: Any, method: str, path: str) -> None:
    response = await api.client.request(method, path, json=V2_TEXT)
    assert problem(response, 404)["detail"] == "model 'echo' has no version '9'"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", {"model": "broken", **CHAT}),
        ("/v1/chat/completions", {"model": "broken", **CHAT, "stream": True}),
        ("/v2/models/broken/infer", V2_TEXT),
        ("/v2/models/broken/versions/1/infer", V2_TEXT),
    ],
)
async def test_a_failed_model_is_503_with_retry_after_and_the_reason(
    api: Any, problem: Any, route: str, body: dict[str, Any]
) -> None:
    response = await api.client.post(route, json=body)
    detail = problem(response, 503)["detail"]
    assert int(response.headers["retry-after"]) >= 1
    assert "failed" in detail and "failing backend refused to load" in detail


@pytest.mark.parametrize(
    ("route", "model", "served", "asked"),
    [
        ("/v1/embeddings", "echo", "chat", "embeddings"),
        ("/v1/classify", "echo", "chat", "classification"),
        ("/v1/chat/completions", "echo-embed", "embeddings", "chat"),
        ("/v1/completions", "echo-cls", "classification", "completion"),
    ],
)
async def test_a_task_mismatch_is_400(
    api: Any, problem: Any, route: str, model: str, served: str, asked: str
) -> None:
    valid = dict(OPENAI_ROUTES)[route]
    body = problem(await api.client.post(route, json={**valid, "model": model}), 400)
    assert body["detail"] == f"model {model!r} serves {served}, not {asked}"


STABLE_BACKEND_DETAIL = (
    "model 'flaky' failed to answer; the server log has the detail under this request id"
)


async def test_a_backend_failure_is_500_and_the_server_keeps_serving(
    api: Any, problem: Any, caplog: pytest.LogCaptureFixture
) -> None:
    for route in ("/v1/chat/completions", "/v2/models/flaky/infer"):
        payload = {"model": "flaky", **CHAT} if route.startswith("/v1") else V2_TEXT
        response = await api.client.post(route, json=payload)
        body = problem(response, 500)
        assert body["title"] == "Backend Error"
        # A stable text and the request id; the exception's class and message go to the log.
        assert body["detail"] == STABLE_BACKEND_DETAIL
        assert body["request_id"] == response.headers["x-request-id"]
        assert "RuntimeError" not in response.text
        assert "failing backend always fails" not in response.text
    assert "failing backend always fails" in caplog.text

    stream = await api.client.post(
        "/v1/chat/completions", json={"model": "flaky", **CHAT, "stream": True}
    )
    assert problem(stream, 500)["detail"] == STABLE_BACKEND_DETAIL

    ok = await api.client.post("/v1/chat/completions", json={"model": "echo", **CHAT})
    assert ok.status_code == 200
    again = await api.client.post("/v1/chat/completions", json={"model": "flaky", **CHAT})
    problem(again, 500)
    assert (await api.client.get("/v2/health/live")).status_code == 200


# -- time and capacity --------------------------------------------------------------------------


async def test_a_request_past_the_timeout_is_504(start_api: Any, problem: Any) -> None:
    # Waits for the real 0.2 s timeout: the timeout itself is what is under test.
    api = await start_api(_model("stuck", backend="hanging"), server={"request_timeout_s": 0.2})
    for route, body in [
        ("/v1/chat/completions", {"model": "stuck", **CHAT}),
        ("/v2/models/stuck/infer", V2_TEXT),
    ]:
        response = await api.client.post(route, json=body)
        detail = problem(response, 504)["detail"]
        assert detail == "model 'stuck' did not answer within 0.2s"
        # The version that timed out is named, like the one that answers a success.
        assert response.headers["x-model-name"] == "stuck"
        assert response.headers["x-model-version"] == "1"


async def _until(condition: Any) -> None:
    for _ in range(10_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def test_a_full_queue_is_503_with_retry_after(start_api: Any, problem: Any) -> None:
    api = await start_api(
        _model("busy", backend="hanging", batching={"max_batch_size": 1, "max_queue_size": 1})
    )
    version = api.service.registry.get("busy")
    backend, batcher = version.backend, version.batcher
    assert isinstance(backend, HangingBackend) and batcher is not None
    body = {"model": "busy", **CHAT}

    in_flight = asyncio.create_task(api.client.post("/v1/chat/completions", json=body))
    await _until(lambda: backend.calls == [1])
    queued = asyncio.create_task(api.client.post("/v2/models/busy/infer", json=V2_TEXT))
    await _until(lambda: batcher.depth == 1)

    for route, payload in [("/v1/chat/completions", body), ("/v2/models/busy/infer", V2_TEXT)]:
        refused = await api.client.post(route, json=payload)
        assert "queue full" in problem(refused, 503)["detail"]
        assert refused.headers["retry-after"] == "1"

    backend.release.set()
    assert (await in_flight).status_code == 200
    assert (await queued).status_code == 200


async def test_a_model_still_loading_is_503(
    start_api: Any, problem: Any, plugin_host: PluginHost
) -> None:
    gate = asyncio.Event()

    class SlowLoad(HangingBackend):
        name = "slow-load"

        async def load(self) -> None:
            await gate.wait()

    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register: Any) -> None:
            register(SlowLoad)

    plugin_host.register(Plugin(), name="slow-load")
    try:
        api = await start_api(_model("later", backend="slow-load"), wait=False)
        response = await api.client.post("/v1/chat/completions", json={"model": "later", **CHAT})
        assert "loading" in problem(response, 503)["detail"]
        assert response.headers["retry-after"] == "5"
        gate.set()
        await api.service.wait_until_loaded()
    finally:
        plugin_host.unregister("slow-load")


async def test_errors_from_a_chosen_version_name_it(api: Any, problem: Any) -> None:
    failed = await api.client.post("/v1/chat/completions", json={"model": "flaky", **CHAT})
    problem(failed, 500)
    assert failed.headers["x-model-name"] == "flaky"
    assert failed.headers["x-model-version"] == "1"
    v2 = await api.client.post("/v2/models/flaky/infer", json=V2_TEXT)
    assert v2.headers["x-model-version"] == "1"
    # No version was chosen for an unknown model: nothing to name.
    unknown = await api.client.post("/v1/chat/completions", json={"model": "nope", **CHAT})
    problem(unknown, 404)
    assert "x-model-version" not in unknown.headers


async def test_an_unexpected_error_is_a_stable_500_with_the_request_id(
    start_api: Any, problem: Any, plugin_host: PluginHost, caplog: pytest.LogCaptureFixture
) -> None:
    class Leaky(HangingBackend):
        name = "leaky"

        async def infer(self, batch: Any) -> Any:
            raise ModelyardError("could not open /srv/models/secret-path/model.onnx")

    class Plugin:
        @staticmethod
        @hookimpl
        def register_backends(register: Any) -> None:
            register(Leaky)

    plugin_host.register(Plugin(), name="leaky")
    try:
        api = await start_api(_model("leaky", backend="leaky"))
        response = await api.client.post("/v1/chat/completions", json={"model": "leaky", **CHAT})
        body = problem(response, 500)
        assert "/srv/models" not in response.text
        assert body["request_id"] == response.headers["x-request-id"]
        assert "/srv/models/secret-path/model.onnx" in caplog.text
    finally:
        plugin_host.unregister("leaky")
