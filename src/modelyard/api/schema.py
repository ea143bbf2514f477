"""What the OpenAPI document at ``/schema`` says beyond what Litestar derives by itself.

Litestar documents each handler's parameters, body and success answer from its signature and
the msgspec Structs it names (constraints included: ``Meta(min_length=1)`` is both the
decoder's rule and the schema's ``minItems``). This module adds what a signature cannot say:

- **Errors** as the server sends them (RFC 9457 ``application/problem+json``, see
  :mod:`modelyard.api.problems`): each handler lists the statuses its own code paths raise
  (``responses=problems(404, 409)``); :func:`describe_routes` adds those every route shares
  (500, 503 when shutting down; 408 and 413 where a body is read) and those of the access
  check (401, 403, 429) where the route's policy asks for a credential. Litestar's own 400 in
  its own shape is dropped: the app's exception handlers never send it.
- **Security per operation**, taken from the access policies of :mod:`modelyard.api.security`
  (a public route declares none), so the document and the check cannot drift apart.
- **Bodies the decoder refuses are refused by the schema**: a Struct with
  ``forbid_unknown_fields`` is ``additionalProperties: false``, and a rule across members
  that a route checks is the Struct's ``__schema_extra__`` (:class:`StrictStructSchemaPlugin`).
- **What a handler reads or writes by hand**: the event stream of a streamed completion
  (:class:`StreamedOperation`), the v2 infer body and answer with the binary tensor extension
  (:class:`TensorOperation`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar

import msgspec
from litestar import Litestar
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import ResponseSpec
from litestar.openapi.spec import (
    Example,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    RequestBody,
    Schema,
    SecurityRequirement,
)
from litestar.routes import HTTPRoute
from litestar.typing import FieldDefinition
from msgspec import UNSET, Meta, UnsetType

from modelyard.api.problems import PROBLEM_JSON, error_is_text

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

__all__ = [
    "BEARER",
    "DocumentedOperation",
    "FieldError",
    "Problem",
    "ProblemError",
    "StreamedOperation",
    "StrictStructSchemaPlugin",
    "TensorOperation",
    "V2Problem",
    "describe_routes",
    "problems",
    "struct_schema",
]

#: The credentials a protected operation takes: an API key or a JWT, both as a bearer token.
BEARER: list[SecurityRequirement] = [{"apiKey": []}, {"jwt": []}]


# -- the problem documents (what api/problems.py sends) ------------------------------------


class ProblemError(msgspec.Struct, frozen=True, kw_only=True):
    """The ``error`` member outside ``/v2``: the object the OpenAI SDK reads."""

    message: str
    type: str
    code: int


class FieldError(msgspec.Struct, frozen=True, kw_only=True):
    """One thing a request body got wrong (``errors`` of a 400 from body validation)."""

    message: str
    key: str
    source: str


class _ProblemFields(msgspec.Struct, frozen=True, kw_only=True):
    type: Annotated[str, Meta(description="A URI naming the kind of problem")]
    title: str
    status: Annotated[int, Meta(ge=400, le=599)]
    detail: Annotated[str, Meta(description="What went wrong; for a 5xx a stable text")]
    instance: Annotated[str, Meta(description="The request's path")]
    request_id: Annotated[str, Meta(description="The X-Request-ID; the server log has it")]
    errors: list[FieldError] | UnsetType = UNSET


class Problem(_ProblemFields, frozen=True, kw_only=True):
    """RFC 9457 problem details. Other members may follow (a swap refused with 409 carries
    its safety ``report``)."""

    error: ProblemError


class V2Problem(_ProblemFields, frozen=True, kw_only=True):
    """RFC 9457 problem details under ``/v2``, whose ``error`` is the text tritonclient reads.
    Other members may follow."""

    error: Annotated[str, Meta(description="The same text as detail")]


_DESCRIPTIONS: Mapping[int, str] = {
    400: "The request is malformed: not JSON, a member of the wrong type or out of range, or "
         "something the model cannot do",
    401: "No credential, or one that is not recognised (see WWW-Authenticate)",
    403: "The credential's roles or model scopes do not allow this",
    404: "No such model, version or alias",
    408: "The request body stalled",
    409: "Refused in the current state: another operation is running, the version is active, "
         "the swap is unsafe (the safety report is in the body) or the cache is off",
    413: "The request body exceeds the server's limit",
    422: "The request exceeds the model's limits, or the new version's configuration is invalid",
    429: "Too many requests; retry after Retry-After seconds",
    500: "The server or the model failed; the detail is in the server log under request_id",
    503: "Not ready, shedding load, the model's breaker is open, or the server is shutting "
         "down; retry after Retry-After seconds",
    504: "The model did not answer in time",
}
_AUTH_STATUSES = (401, 403, 429)
_SHARED_STATUSES = (500, 503)  # an unexpected error; a request cut off by the drain
_BODY_STATUSES = (400, 408, 413)  # a body that does not decode, stalls or is too large


def problems(*statuses: int) -> dict[int, ResponseSpec]:
    """``responses=`` of a route handler: the problem documents it may answer with."""
    return {
        status: ResponseSpec(
            data_container=Problem,
            media_type=PROBLEM_JSON,
            description=_DESCRIPTIONS[status],
            generate_examples=False,
        )
        for status in statuses
    }


# -- operations ------------------------------------------------------------------------------

_RETRY_AFTER = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
    description="Seconds to wait before retrying",
)
_WWW_AUTHENTICATE = OpenAPIHeader(
    schema=Schema(type=OpenAPIType.STRING), description="The bearer challenge (RFC 6750)"
)
_HEADERS = {"401": {"WWW-Authenticate": _WWW_AUTHENTICATE}, "429": {"Retry-After": _RETRY_AFTER},
            "503": {"Retry-After": _RETRY_AFTER}}


@dataclass
class DocumentedOperation(Operation):
    """An operation whose errors are the problem documents the server sends, nothing else.

    Litestar adds a 400 in its own ``application/json`` shape to every operation with a
    parameter or a body; the app's exception handlers never send that shape, so it goes.
    """

    def __post_init__(self) -> None:
        responses = self.responses or {}
        for status, response in list(responses.items()):
            if not isinstance(response, OpenAPIResponse) or int(status) < 400:
                continue
            if not response.content or PROBLEM_JSON not in response.content:
                del responses[status]
            elif status in _HEADERS:
                response.headers = {**(response.headers or {}), **_HEADERS[status]}


_SSE_EVENT = Schema(
    type=OpenAPIType.OBJECT,
    required=["data"],
    properties={
        "data": Schema(
            type=OpenAPIType.STRING,
            description="A JSON chunk object (OpenAI's chat.completion.chunk or "
                        "text_completion), an error object {\"error\": {...}} when the model "
                        "fails mid-stream, or the final [DONE]",
        ),
        "event": Schema(type=OpenAPIType.STRING),
    },
    description="One server-sent event",
)


@dataclass
class StreamedOperation(DocumentedOperation):
    """A completion that answers ``stream: true`` with server-sent events."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.description = "The completion; with stream: true, server-sent events"
            ok.content = {**(ok.content or {}),
                          "text/event-stream": OpenAPIMediaType(schema=_SSE_EVENT)}


_BINARY_TENSORS = (
    "the JSON header (its length in the Inference-Header-Content-Length header), then each "
    "tensor whose parameters name a binary_data_size, raw and little-endian (a BYTES element "
    "is prefixed by its 4-byte length)"
)
_HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass
class TensorOperation(DocumentedOperation):
    """v2 ``infer``, which reads its body by hand: JSON, or JSON then binary tensors.

    A subclass names the JSON body's Struct in ``body`` (and ``examples`` of it); the
    handler's documented 200 is the JSON answer, which comes as ``application/octet-stream``
    when binary outputs follow it.
    """

    body: ClassVar[type[msgspec.Struct]]
    examples: ClassVar[dict[str, Any]] = {}

    def __post_init__(self) -> None:
        super().__post_init__()
        binary = OpenAPIMediaType(schema=Schema(
            type=OpenAPIType.STRING,
            description=f"The binary tensor data extension: {_BINARY_TENSORS}",
        ))
        self.request_body = RequestBody(
            required=True,
            description="JSON tensors; or, with the binary tensor data extension, "
                        + _BINARY_TENSORS,
            content={
                "application/json": OpenAPIMediaType(
                    schema=struct_schema(self.body),
                    examples={name: Example(value=value) for name, value in self.examples.items()}
                    or None,
                ),
                "application/octet-stream": binary,
            },
        )
        self.parameters = [*(self.parameters or []), Parameter(
            name=_HEADER_LENGTH, param_in="header", required=False,
            schema=Schema(type=OpenAPIType.INTEGER, minimum=1),
            description="The JSON header's length in bytes, when binary tensor data follows it",
        )]
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.headers = {**(ok.headers or {}), _HEADER_LENGTH: OpenAPIHeader(
                schema=Schema(type=OpenAPIType.INTEGER),
                description="Present when binary outputs follow the JSON header",
            )}
            ok.content = {**(ok.content or {}), "application/octet-stream": binary}


# -- a Struct as an inline schema ------------------------------------------------------------

#: JSON Schema keywords msgspec writes whose Schema field is spelt otherwise.
_SCHEMA_FIELDS: dict[str, str] = {
    "anyOf": "any_of", "oneOf": "one_of", "allOf": "all_of", "not": "schema_not",
    "additionalProperties": "additional_properties", "minItems": "min_items",
    "maxItems": "max_items", "minLength": "min_length", "maxLength": "max_length",
    "exclusiveMinimum": "exclusive_minimum", "exclusiveMaximum": "exclusive_maximum",
    "multipleOf": "multiple_of", "minProperties": "min_properties",
    "maxProperties": "max_properties", "uniqueItems": "unique_items",
}
_SUBSCHEMAS = frozenset({"items", "additionalProperties", "anyOf", "oneOf", "allOf", "not"})


def struct_schema(struct: type[msgspec.Struct]) -> Schema:
    """``struct`` as msgspec's decoder sees it (its own JSON Schema), inlined."""
    raw = msgspec.json.schema(struct)
    definitions = raw.get("$defs", {})

    def convert(node: Any) -> Any:
        if isinstance(node, list):
            return [convert(x) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return convert(definitions[node["$ref"].rsplit("/", 1)[-1]])
        fields: dict[str, Any] = {}
        for key, value in node.items():
            attribute = _SCHEMA_FIELDS.get(str(key), str(key))
            if key == "properties":
                fields[attribute] = {k: convert(v) for k, v in value.items()}
            elif key in _SUBSCHEMAS:
                fields[attribute] = convert(value)
            elif key != "$defs":
                fields[attribute] = value
        return Schema(**fields)

    converted: Schema = convert(raw)
    return converted


# -- Structs as the decoder reads them -------------------------------------------------------


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Litestar's Struct schemas, as strict as the decoder, and extended where a Struct asks.

    - A Struct with ``forbid_unknown_fields`` documents ``additionalProperties: false``: Litestar
      leaves every object open, so a body the decoder refuses for an unknown member looked
      valid in the schema.
    - A bound of zero (``Meta(gt=0)``, ``Meta(ge=0.0)``) is kept: Litestar skips falsy bounds,
      so ``top_p: 0`` looked valid and was refused.
    - A Struct's ``__schema_extra__`` (Schema field names to values) is added to its schema,
      for a rule across members that the route checks (``if``/``then``).

    Litestar's Struct plugin is private in Litestar 2 (pinned ``<3``); this subclass is all
    we take from it.
    """

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        struct = field_definition.type_
        if struct.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        info = msgspec.inspect.type_info(struct)
        assert isinstance(info, msgspec.inspect.StructType)
        for field in info.fields:
            prop = (schema.properties or {}).get(field.encode_name)
            if isinstance(prop, Schema):
                for name, value in _zero_bounds(field.type).items():
                    setattr(prop, name, value)
        for name, value in getattr(struct, "__schema_extra__", {}).items():
            setattr(schema, name, value)
        return schema


_BOUNDS = (("ge", "minimum"), ("gt", "exclusive_minimum"), ("le", "maximum"),
           ("lt", "exclusive_maximum"))


def _zero_bounds(kind: msgspec.inspect.Type) -> dict[str, int]:
    """The numeric bounds of a field (or of its one non-null member) that are zero."""
    if isinstance(kind, msgspec.inspect.Metadata):
        kind = kind.type
    if isinstance(kind, msgspec.inspect.UnionType):
        members = [t for t in kind.types if not isinstance(t, msgspec.inspect.NoneType)]
        kind = members[0] if len(members) == 1 else kind
    if isinstance(kind, msgspec.inspect.Metadata):
        kind = kind.type
    if not isinstance(kind, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        return {}
    return {name: 0 for bound, name in _BOUNDS if getattr(kind, bound) == 0}


# -- per route: security and the errors every route shares -----------------------------------

#: ``is_public(method, path_template)``: True when the route's policy asks for no credential.
PublicCheck = Callable[[str, str], bool]


def describe_routes(app: Litestar, is_public: PublicCheck) -> None:
    """Give every documented operation of ``app`` its security and its shared errors.

    Call once the app is built and before its schema is first generated (Litestar builds it
    lazily, on the first request for ``/schema``).
    """
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        v2 = error_is_text(route.path_format)
        for handler in route.route_handlers:
            if not handler.resolve_include_in_schema():
                continue
            public = all(is_public(m, route.path_format) for m in _methods(handler))
            _describe(handler, public=public, v2=v2)


def _methods(handler: HTTPRouteHandler) -> Iterable[str]:
    return sorted(handler.http_methods - {"OPTIONS", "HEAD"}) or sorted(handler.http_methods)


def _describe(handler: HTTPRouteHandler, *, public: bool, v2: bool) -> None:
    statuses = list(_SHARED_STATUSES)
    if "data" in handler.parsed_fn_signature.parameters:
        statuses += _BODY_STATUSES
    if not public:
        statuses += _AUTH_STATUSES
        handler.security = BEARER
    shared = problems(*statuses)
    own = dict(handler.responses or {})
    responses = {**shared, **own}  # a handler's own description of a status wins
    if v2:
        responses = {
            status: dataclasses.replace(spec, data_container=V2Problem)
            if spec.data_container is Problem else spec
            for status, spec in responses.items()
        }
    handler.responses = responses
    if handler.operation_class is Operation:
        handler.operation_class = DocumentedOperation

