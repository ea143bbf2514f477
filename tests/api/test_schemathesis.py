"""The OpenAPI document tells the truth: schemathesis drives every operation of the app.

The app runs in process (ASGI, its lifespan started by schemathesis) on the fake backends,
with API-key auth on so that the ``ignored_auth`` check proves every operation declaring a
credential refuses a request without one or with a bad one, while the public ones (health)
need none. The run is schemathesis' own engine, as ``st run`` drives it: probes, the schema's
examples, the coverage phase (boundary values, wrong types, missing members, methods the path
does not serve) and fuzzing, with every built-in check: no 5xx; statuses, content types,
headers and bodies as documented; schema-valid data accepted and schema-invalid data refused;
``Allow`` true. Generation is bounded and derandomized for CI (about 1,800 requests in 20 s);
the figures are printed at the end (``-s`` shows them).

Bounded choices, each with its reason:

- Requests name a real model of the right task about two times in three (the rest: a drawn
  name, 404), so the inference paths run end to end.
- ``dimensions`` of an embedding request is the model's width: another width is refused (400)
  by a model that cannot change it, a rule of the model the schema cannot state.
- A v2 infer body that matches the schema may still be refused (400): JSON Schema cannot tie a
  tensor's ``data`` to its ``shape`` and ``datatype``, nor name the inputs a model takes. That
  operation's ``positive_data_acceptance`` also allows 400; every other check holds in full.
- Only read and inference routes name real models, and only from the lists below: values
  seen in responses are not reused, and the stateful phase (which chains them from one
  response into the next request) is off. The
  routes that change a model (load, unload, versions, swap, rollback, canary) get drawn names
  (404): a real one would unload the demo models mid-run, after which every request is a
  truthful 503; a real one also sends a chat model's name to the classify route (400, a rule
  of the model no schema can state) and drawn backend ``options`` to a real model (422, the
  backend's own options Struct refuses them). tests/api/test_admin_*.py drive those routes on
  purpose.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.engine import events  # noqa: E402
from schemathesis.python import asgi  # noqa: E402

from modelyard.api.app import create_app  # noqa: E402
from modelyard.cache import plugin as cache_plugin  # noqa: E402
from modelyard.core.plugins import PluginHost  # noqa: E402
from modelyard.core.settings import decode_settings  # noqa: E402
from modelyard.plugins import auth as auth_plugin  # noqa: E402
from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore  # noqa: E402
from modelyard.testing import plugin as fake_plugin  # noqa: E402

EMBEDDING_DIM = 16
MODELS = [
    {"name": "echo", "backend": "echo", "source": ".", "task": "chat"},
    {"name": "echo-embed", "backend": "echo", "source": ".", "task": "embeddings",
     "options": {"dim": EMBEDDING_DIM}},
    {"name": "echo-classify", "backend": "echo", "source": ".", "task": "classification"},
    {"name": "doubler", "backend": "echo", "source": ".", "task": "tensor"},
]
#: Examples per operation and phase: enough to reach every branch the schema opens, small
#: enough for CI (the run takes well under a minute on two cores).
MAX_EXAMPLES = 15
SEED = 19
REAL_NAME = 0.7


def _bind(path: str, key: str, dictionary: str) -> dict[str, Any]:
    return {"include-path": path,
            "parameters": {key: {"dictionary": dictionary, "probability": REAL_NAME}}}


def _config(key: str) -> Any:
    model_routes = [
        "/v2/models/{name}", "/v2/models/{name}/versions/{version}", "/v2/models/{name}/ready",
        "/v2/models/{name}/versions/{version}/ready", "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ]
    return schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
        "auth": {"openapi": {"apiKey": {"bearer": key}}},
        "phases": {
            **{phase: {"extra-data-sources": {"responses": False}}
               for phase in ("examples", "coverage", "fuzzing")},
            "stateful": {"enabled": False},
        },
        "dictionaries": {
            "chat": {"values": ["echo"]},
            "embeddings": {"values": ["echo-embed"]},
            "classification": {"values": ["echo-classify"]},
            "models": {"values": [m["name"] for m in MODELS]},
            "versions": {"values": ["1"]},
            "width": {"values": [EMBEDDING_DIM]},
        },
        "operations": [
            _bind("/v1/chat/completions", "body.model", "chat"),
            _bind("/v1/completions", "body.model", "chat"),
            {"include-path": "/v1/embeddings", "parameters": {
                "body.model": {"dictionary": "embeddings", "probability": REAL_NAME},
                "body.dimensions": {"dictionary": "width", "probability": 1.0},
            }},
            _bind("/v1/classify", "body.model", "classification"),
            *({"include-path": path, "parameters": {
                "path.name": {"dictionary": "models", "probability": REAL_NAME},
                "path.version": {"dictionary": "versions", "probability": REAL_NAME},
            }} for path in model_routes),
            {"include-path-regex": r"^/v2/models/\{name\}(/versions/\{version\})?/infer$",
             "checks": {"positive_data_acceptance": {
                 "expected-statuses": ["2xx", "400", "401", "403", "404", "409", "429", "5xx"],
             }}},
        ],
    })


def _host() -> PluginHost:
    host = PluginHost(allow=())
    host.register(fake_plugin, name="testing", source="modelyard.testing")
    host.register(auth_plugin, name="auth", source="modelyard")
    host.register(cache_plugin, name="cache", source="modelyard")
    return host


@pytest.fixture
def api_schema(tmp_path: Path) -> Iterator[Any]:
    database = str(tmp_path / "keys.sqlite3")
    settings = decode_settings({
        "models": MODELS,
        "auth": {"providers": [{"provider": "apikeys", "options": {"database": database}}],
                 "audit_log": str(tmp_path / "audit.jsonl")},
        "cache": {"enabled": True, "directory": str(tmp_path / "cache")},
    }, env={})
    app = create_app(settings, plugins=_host())
    key = KeyStore.open(ApiKeyOptions(database=database)).create(
        name="schemathesis", roles=["admin"]
    ).key
    try:
        schema = schemathesis.openapi.from_asgi("/schema/openapi.json", app, config=_config(key))
        _wait_ready(schema)
        yield schema
    finally:
        asgi.shutdown_lifespans()  # the app's lifespan: the service stops, its models unload


def _wait_ready(schema: Any) -> None:
    ready = schema["/v2/health/ready"]["GET"]
    deadline = time.monotonic() + 30
    while ready.Case().call().status_code != 200:
        assert time.monotonic() < deadline, "the app never became ready"
        time.sleep(0.01)


@dataclass
class Run:
    operations: set[str] = field(default_factory=set)
    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, recorder: Any) -> None:
        self.operations.add(recorder.label)
        self.cases += len(recorder.cases)
        for interaction in recorder.interactions.values():
            if interaction.response is not None:
                self.statuses[interaction.response.status_code] += 1
        for checks in recorder.checks.values():
            for check in checks:
                self.checks[check.name] += 1
                if check.failure_info is not None:
                    failure = check.failure_info.failure
                    self.failures.append(
                        f"{recorder.label} [{check.name}] {failure.title}\n{failure.message}\n"
                        f"{check.failure_info.code_sample}"
                    )

    def summary(self) -> str:
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return (f"schemathesis: {len(self.operations)} operations, {self.cases} test cases, "
                f"{len(self.checks)} checks run {sum(self.checks.values())} times, "
                f"{len(self.failures)} failures, {len(self.errors)} errors in {self.seconds:.1f}s "
                f"(responses by status: {statuses})")


def run_engine(schema: Any) -> Run:
    run = Run()
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            run.record(event.recorder)
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            run.errors.append(f"fatal: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            run.seconds = event.running_time
    return run


def test_every_operation_keeps_the_promises_of_the_schema(api_schema: Any) -> None:
    run = run_engine(api_schema)
    print("\n" + run.summary())
    assert not run.errors, "\n\n".join(run.errors)
    assert not run.failures, "\n\n".join(sorted(set(run.failures)))
    assert not any(status >= 500 for status in run.statuses), run.summary()
    documented = {f"{m.upper()} {p}" for p, ops in api_schema.raw_schema["paths"].items()
                  for m in ops if m in {"get", "post", "put", "patch", "delete"}}
    assert documented <= run.operations, f"untested: {sorted(documented - run.operations)}"

