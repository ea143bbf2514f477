"""The OpenAPI document at /schema describes the server: errors, bodies, security, Allow.

tests/api/test_schemathesis.py checks the same promises by driving every operation; these
tests name them one by one, so a regression says which promise broke.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, get_args

import msgspec
import pytest
from litestar.routes import HTTPRoute

from modelyard.api.openai import ChatCompletionBody, _Sampling
from modelyard.api.problems import problem_body
from modelyard.api.schema import BEARER, Problem, V2Problem
from modelyard.api.security import PUBLIC_PREFIXES, Permission, policy_for
from modelyard.api.v2 import V2Datatype
from modelyard.core.logs import RequestInfo, bind_request, release_request
from modelyard.core.types import V2_DATATYPES, GenerationParams

ECHO = {"name": "echo", "backend": "echo", "source": ".", "task": "chat"}
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture
async def document(start_api: Any) -> dict[str, Any]:
    api = await start_api(ECHO)
    response = await api.client.get("/schema/openapi.json")
    assert response.status_code == 200
    schema: dict[str, Any] = response.json()
    return schema


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                yield method.upper(), path, item[method]


def _ref(document: dict[str, Any], ref: str) -> dict[str, Any]:
    found: dict[str, Any] = document["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return found


async def test_every_error_is_documented_as_the_problem_the_server_sends(
    document: dict[str, Any],
) -> None:
    for method, path, operation in _operations(document):
        shape = "V2Problem" if path.startswith("/v2") else "Problem"
        errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
        assert {"500", "503"} <= set(errors), f"{method} {path}"
        for status, response in errors.items():
            assert list(response["content"]) == ["application/problem+json"], (
                f"{method} {path} {status}: {response}"
            )
            schema = response["content"]["application/problem+json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{shape}"}, f"{method} {path}"
    problem = _ref(document, "Problem")
    assert set(problem["required"]) == {
        "type", "title", "status", "detail", "instance", "request_id", "error",
    }
    assert _ref(document, "V2Problem")["properties"]["error"]["type"] == "string"


@pytest.mark.parametrize(("path", "shape"), [("/v1/chat/completions", Problem),
                                             ("/v2/models/x/infer", V2Problem)])
def test_the_documented_problem_is_what_problems_py_sends(path: str, shape: type) -> None:
    token = bind_request(RequestInfo("req-1", method="POST", path=path))
    try:
        body, _ = problem_body(path, status=404, title="Not Found", detail="no such model",
                               type_slug="model-not-found")
    finally:
        release_request(token)
    decoded = msgspec.json.decode(body, type=shape)  # every documented member, typed right
    assert decoded.request_id == "req-1" and decoded.instance == path


async def test_operations_document_the_statuses_their_code_raises(
    document: dict[str, Any],
) -> None:
    def statuses(method: str, path: str) -> set[str]:
        return set(document["paths"][path][method.lower()]["responses"])

    assert {"200", "400", "404", "408", "413", "422", "503", "504"} <= statuses(
        "POST", "/v1/chat/completions")
    assert {"200", "400", "404", "408", "413", "422", "504"} <= statuses(
        "POST", "/v2/models/{name}/infer")
    assert {"404", "409", "422"} <= statuses("POST", "/admin/models/{name}/versions")
    assert {"404", "409"} <= statuses("POST", "/admin/models/{name}/swap")
    assert {"409"} <= statuses("DELETE", "/admin/cache")
    # No body, no parameter that can fail: no 400, and Litestar's own 400 is gone everywhere.
    assert "400" not in statuses("GET", "/v2/models/{name}")
    assert statuses("GET", "/v2/health/live") == {"200", "500", "503"}


async def test_security_is_per_operation_and_follows_the_access_policies(
    document: dict[str, Any],
) -> None:
    assert "security" not in document
    public = []
    for method, path, operation in _operations(document):
        policy = policy_for(method, path)
        assert policy is not None, f"{method} {path} has no policy"
        if policy.permission is Permission.PUBLIC:
            public.append(f"{method} {path}")
            assert "security" not in operation
            assert not {"401", "403", "429"} & set(operation["responses"])
        else:
            assert operation["security"] == BEARER, f"{method} {path}"
            assert {"401", "403", "429"} <= set(operation["responses"]), f"{method} {path}"
    assert public == ["GET /v2/health/live", "GET /v2/health/ready"]
    assert all(not path.startswith(PUBLIC_PREFIXES) for path in document["paths"])


async def test_infer_documents_its_json_and_binary_body_and_its_answer(
    document: dict[str, Any],
) -> None:
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        operation = document["paths"][path]["post"]
        body = operation["requestBody"]
        assert body["required"] is True
        assert "binary tensor data extension" in body["description"]
        assert set(body["content"]) == {"application/json", "application/octet-stream"}
        tensors = body["content"]["application/json"]["schema"]
        assert tensors["required"] == ["inputs"]
        assert tensors["properties"]["inputs"]["minItems"] == 1
        one = tensors["properties"]["inputs"]["items"]
        assert set(one["properties"]["datatype"]["enum"]) == V2_DATATYPES
        ok = operation["responses"]["200"]
        assert set(ok["content"]) == {"application/json", "application/octet-stream"}
        answer = _ref(document, ok["content"]["application/json"]["schema"]["$ref"])
        assert set(answer["required"]) == {"model_name", "model_version", "outputs"}
        header = {p["name"]: p for p in operation["parameters"] if p["in"] == "header"}
        assert header["Inference-Header-Content-Length"]["required"] is False


async def test_streamed_completions_and_metrics_document_their_content_types(
    document: dict[str, Any],
) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        content = document["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(content) == {"application/json", "text/event-stream"}
        assert content["text/event-stream"]["schema"]["required"] == ["data"]
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain", "application/openmetrics-text"}


async def test_bodies_the_decoder_refuses_are_refused_by_the_schema(
    document: dict[str, Any], start_api: Any, problem: Any
) -> None:
    schemas = document["components"]["schemas"]
    for closed in ("NewVersionBody", "SwapBody", "CanaryBody"):
        assert schemas[closed]["additionalProperties"] is False, closed
    # OpenAI bodies stay open to members we ignore, as the decoder is.
    assert "additionalProperties" not in schemas["ChatCompletionBody"]
    chat = schemas["ChatCompletionBody"]["properties"]
    assert chat["messages"]["minItems"] == 1
    assert chat["top_p"]["exclusiveMinimum"] == 0 and chat["temperature"]["minimum"] == 0
    assert chat["n"]["enum"] == [1]
    assert chat["logprobs"]["enum"] == [False, 0, None]
    assert schemas["CanaryBody"]["properties"]["percent"]["exclusiveMinimum"] == 0
    completion = schemas["CompletionBody"]
    assert completion["properties"]["prompt"]["oneOf"][1]["minItems"] == 1
    assert completion["if"]["properties"]["stream"] == {"const": True}

    api = await start_api(ECHO)
    refused = [
        ("/v1/chat/completions", {"model": "echo", "messages": []}),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "u", "content": "x"}],
                                  "top_p": 0}),
        ("/v1/completions", {"model": "echo", "prompt": ["a", "b"], "stream": True}),
        ("/admin/models/echo/swap", {"to": "1", "unknown": True}),
        ("/admin/models/echo/canary", {"to": "1", "percent": 0}),
        # Limited by the schema, refused by the route with its own words.
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "u", "content": "x"}],
                                  "n": 2}),
        ("/v1/chat/completions", {"model": "echo", "messages": [{"role": "u", "content": "x"}],
                                  "logprobs": True}),
    ]
    for path, body in refused:
        problem(await api.client.post(path, json=body), 400)


def test_the_wire_ranges_are_the_generation_params_ranges() -> None:
    def bounds(struct: type[msgspec.Struct]) -> dict[str, Any]:
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        found = {}
        for field in info.fields:
            kind = field.type
            if isinstance(kind, msgspec.inspect.UnionType):
                kind = next(t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType))
            if isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
                found[field.name] = (kind.ge, kind.gt, kind.le, kind.lt)
        return found

    wire, core = bounds(_Sampling), bounds(GenerationParams)
    for name, limits in core.items():
        assert wire[name] == limits, name
    assert bounds(ChatCompletionBody)["max_completion_tokens"] == core["max_tokens"]


def test_the_v2_datatypes_are_the_core_ones() -> None:
    assert set(get_args(V2Datatype)) == V2_DATATYPES


async def test_options_lists_every_method_of_the_path(start_api: Any) -> None:
    api = await start_api(ECHO)
    response = await api.client.options("/admin/cache")
    assert response.status_code == 204
    assert set(response.headers["allow"].split(", ")) == {"DELETE", "GET", "OPTIONS"}
    canary = await api.client.options("/admin/models/echo/canary")
    assert set(canary.headers["allow"].split(", ")) == {"DELETE", "OPTIONS", "POST"}
    for route in api.app.routes:
        if not isinstance(route, HTTPRoute) or "{" in route.path:
            continue
        allow = (await api.client.options(route.path)).headers.get("allow", "")
        assert set(allow.split(", ")) == set(route.methods), route.path
