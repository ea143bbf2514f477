"""Probes: one short real request of a version's task, for warm-up, swap safety and health.

A probe goes to the version's own batcher (or its backend before it has one), never through
the public router, under its own timeout. The request is built in per task — a one-token chat
or completion, one short text to embed or classify, zeros for every tensor input the backend
describes — or taken from ``[models.probe]``, whose ``expect`` table adds checks on the answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta, Struct, field

from modelyard.core.backend import BackendInfo
from modelyard.core.errors import ModelyardError
from modelyard.core.types import (
    V2_DATATYPES,
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    ClassificationResult,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationParams,
    GenerationResult,
    InferenceRequest,
    InferenceResult,
    Task,
    Tensor,
    TensorRequest,
    TensorResult,
    TensorSpec,
)

if TYPE_CHECKING:
    from modelyard.core.registry import ModelVersion

__all__ = [
    "HealthProber",
    "ProbeExpect",
    "ProbeMessage",
    "ProbeOutcome",
    "ProbeSettings",
    "ProbeTensor",
    "Sleeper",
    "build_probe",
    "check_answer",
    "compare_io",
    "run_probe",
]

log = logging.getLogger(__name__)

#: ``await sleep(seconds)``; tests inject one that returns when they say so.
Sleeper = Callable[[float], Awaitable[None]]

PROBE_TEXT = "Hi"

_ZERO: dict[str, Any] = {"BOOL": False, "BYTES": b"", "FP16": 0.0, "FP32": 0.0, "FP64": 0.0}


# -- configuration -----------------------------------------------------------------------------


class ProbeMessage(Struct, forbid_unknown_fields=True, kw_only=True):
    role: str = "user"
    content: str


class ProbeTensor(Struct, forbid_unknown_fields=True, kw_only=True):
    """One input of a tensor probe; ``data`` is flat, row-major."""

    name: str
    datatype: str
    shape: list[Annotated[int, Meta(ge=0)]]
    data: list[Any]

    def __post_init__(self) -> None:
        # msgspec turns these into ValidationErrors that name the field's path.
        if self.datatype not in V2_DATATYPES:
            raise ValueError(f"datatype {self.datatype!r} is not a v2 datatype")
        if len(self.data) != math.prod(self.shape):
            raise ValueError(
                f"shape {self.shape} needs {math.prod(self.shape)} values, got {len(self.data)}"
            )


class ProbeExpect(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[models.probe.expect]``: checks on the probe's answer beyond "it answered"."""

    #: chat, completion: the generated text contains this.
    text_contains: str | None = None
    #: embeddings: every vector has this many dimensions.
    dimensions: Annotated[int, Meta(ge=1)] | None = None
    #: classification: these labels appear among the answer's labels.
    labels_include: list[str] = field(default_factory=list)
    #: tensor: these output tensors are in the answer.
    outputs_include: list[str] = field(default_factory=list)


class ProbeSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[models.probe]``: the request sent to warm up, check and watch a version."""

    #: Probe once at load (a failure marks the version failed); None: ``server.warmup`` decides.
    warmup: bool | None = None
    #: How long a probe may take; default ``server.probe_timeout_s``.
    timeout_s: Annotated[float, Meta(gt=0)] | None = None
    #: chat: the conversation (default: ``prompt``, else one short user message).
    messages: Annotated[list[ProbeMessage], Meta(min_length=1)] | None = None
    #: completion: the prompt; also the chat message and the text for text tasks when those
    #: fields are not given.
    prompt: Annotated[str, Meta(min_length=1)] | None = None
    #: embeddings, classification: the texts.
    inputs: Annotated[list[str], Meta(min_length=1)] | None = None
    #: tensor: the inputs (default: zeros for every input the backend describes).
    tensors: Annotated[list[ProbeTensor], Meta(min_length=1)] | None = None
    #: chat, completion: tokens to generate.
    max_tokens: Annotated[int, Meta(ge=1, le=4096)] = 1
    expect: ProbeExpect = field(default_factory=ProbeExpect)


# -- building and judging one probe ------------------------------------------------------------


class ProbeOutcome(Struct, frozen=True, kw_only=True):
    """What one probe found: ok, or why not; embedding width when it embedded."""

    ok: bool
    detail: str
    dimensions: int | None = None
    #: Turned away before the backend was asked (a full queue): says nothing of its health.
    refused: bool = False


def build_probe(task: Task, settings: ProbeSettings, info: BackendInfo) -> InferenceRequest:
    """The request a version of ``task`` is probed with; ValueError when none can be built."""
    text = settings.prompt or PROBE_TEXT
    params = GenerationParams(max_tokens=settings.max_tokens, temperature=0.0)
    if task == Task.CHAT:
        messages = settings.messages or [ProbeMessage(content=text)]
        return ChatRequest(tuple(ChatMessage(m.role, m.content) for m in messages), params)
    if task == Task.COMPLETION:
        return CompletionRequest(text, params)
    texts = tuple(settings.inputs or [text])
    if task == Task.EMBEDDINGS:
        return EmbeddingRequest(texts)
    if task == Task.CLASSIFICATION:
        return ClassificationRequest(texts)
    if settings.tensors:
        return TensorRequest(
            tuple(Tensor(t.name, t.datatype, tuple(t.shape), list(t.data))
                  for t in settings.tensors)
        )
    if not info.inputs:
        raise ValueError(
            "the backend describes no inputs to build a tensor probe from; "
            "set [models.probe] tensors"
        )
    return TensorRequest(tuple(_zeros(spec) for spec in info.inputs))


def _zeros(spec: TensorSpec) -> Tensor:
    shape = tuple(1 if d < 0 else d for d in spec.shape)
    return Tensor(spec.name, spec.datatype, shape, [_ZERO.get(spec.datatype, 0)] * math.prod(shape))


def check_answer(request: InferenceRequest, result: InferenceResult, expect: ProbeExpect) -> str:
    """Why ``result`` is not a sound answer to the probe ``request``; '' when it is."""
    if isinstance(request, ChatRequest | CompletionRequest):
        if not isinstance(result, GenerationResult):
            return f"a {request.task.value} probe got {type(result).__name__}"
        if expect.text_contains is not None and expect.text_contains not in result.text:
            return f"the answer {result.text[:80]!r} lacks {expect.text_contains!r}"
        return ""
    if isinstance(request, EmbeddingRequest):
        return _check_embeddings(request, result, expect)
    if isinstance(request, ClassificationRequest):
        if not isinstance(result, ClassificationResult):
            return f"a classification probe got {type(result).__name__}"
        if len(result.labels) != len(request.inputs) or not all(result.labels):
            return f"{len(request.inputs)} texts got {len(result.labels)} label lists"
        seen = {label.label for row in result.labels for label in row}
        missing = [x for x in expect.labels_include if x not in seen]
        return f"labels {missing} are missing from the answer" if missing else ""
    if not isinstance(result, TensorResult):
        return f"a tensor probe got {type(result).__name__}"
    if not result.outputs:
        return "the answer holds no output tensor"
    names = {t.name for t in result.outputs}
    missing = [x for x in expect.outputs_include if x not in names]
    return f"outputs {missing} are missing from the answer" if missing else ""


def _check_embeddings(
    request: EmbeddingRequest, result: InferenceResult, expect: ProbeExpect
) -> str:
    if not isinstance(result, EmbeddingResult):
        return f"an embeddings probe got {type(result).__name__}"
    rows = result.embeddings
    if len(rows) != len(request.inputs):
        return f"{len(request.inputs)} texts got {len(rows)} vectors"
    widths = {len(row) for row in rows}
    if len(widths) != 1 or 0 in widths:
        return f"the vectors have widths {sorted(widths)}"
    if not all(math.isfinite(x) for row in rows for x in row):
        return "the vectors hold NaN or infinite values"
    width = widths.pop()
    if expect.dimensions is not None and width != expect.dimensions:
        return f"the vectors have {width} dimensions, expected {expect.dimensions}"
    return ""


async def run_probe(version: ModelVersion, *, timeout_s: float) -> ProbeOutcome:
    """Send ``version`` its probe and judge the answer; never raises but on cancellation."""
    backend, batcher = version.backend, version.batcher
    if backend is None or version.task is None:
        return ProbeOutcome(ok=False, detail="not loaded")
    try:
        request = build_probe(version.task, version.spec.probe, backend.info())
    except ValueError as exc:
        return ProbeOutcome(ok=False, detail=str(exc))
    try:
        async with asyncio.timeout(timeout_s):
            if batcher is not None:
                result = await batcher.submit(request)
            else:
                result = (await backend.infer([request]))[0]
    except TimeoutError:
        return ProbeOutcome(ok=False, detail=f"no answer within {timeout_s:g}s")
    except ModelyardError as exc:  # its detail is written for clients
        return ProbeOutcome(ok=False, detail=exc.detail, refused=not exc.counts_as_failure)
    except Exception:  # a runtime's own text may hold paths: it goes to the log only
        log.exception("probe of %s:%s raised", version.name, version.version)
        return ProbeOutcome(
            ok=False, detail="the backend raised an unexpected error; the server log has it"
        )
    problem = check_answer(request, result, version.spec.probe.expect)
    if problem:
        return ProbeOutcome(ok=False, detail=problem)
    dims = None
    if isinstance(result, EmbeddingResult) and result.embeddings:
        dims = len(result.embeddings[0])
    return ProbeOutcome(ok=True, detail=f"answered a {version.task.value} probe", dimensions=dims)


def compare_io(active: BackendInfo, target: BackendInfo) -> str:
    """Why ``target``'s tensors cannot stand in for ``active``'s; '' when they can."""
    for kind, old, new in (("input", active.inputs, target.inputs),
                           ("output", active.outputs, target.outputs)):
        problem = _compare_specs(kind, old, new)
        if problem:
            return problem
    return ""


def _compare_specs(kind: str, old: Sequence[TensorSpec], new: Sequence[TensorSpec]) -> str:
    old_by, new_by = {s.name: s for s in old}, {s.name: s for s in new}
    if set(old_by) != set(new_by):
        return f"{kind}s differ: {sorted(old_by)} -> {sorted(new_by)}"
    for name, was in old_by.items():
        now = new_by[name]
        if was.datatype != now.datatype:
            return f"{kind} {name!r} datatype {was.datatype} -> {now.datatype}"
        if not _shapes_fit(was.shape, now.shape):
            return f"{kind} {name!r} shape {list(was.shape)} -> {list(now.shape)}"
    return ""


def _shapes_fit(a: Sequence[int], b: Sequence[int]) -> bool:
    """Same rank, and every axis equal or dynamic (-1) on either side."""
    return len(a) == len(b) and all(x == y or x < 0 or y < 0 for x, y in zip(a, b, strict=True))


# -- periodic health probes --------------------------------------------------------------------


class HealthProber:
    """Probes every serving version on its interval; feeds its breaker and its ``health``.

    Off unless an interval is set. A version is first probed one interval after it is seen
    serving (warm-up covers the moment it loads). While its breaker is open a version is left
    alone: the breaker admits probes again when it half-opens, and their outcomes close it.
    """

    def __init__(
        self,
        versions: Callable[[], Iterable[ModelVersion]],
        *,
        interval_of: Callable[[ModelVersion], float],
        timeout_of: Callable[[ModelVersion], float],
        idle_s: float,
        clock: Callable[[], float],
        sleep: Sleeper = asyncio.sleep,
        wall_clock: Callable[[], float] = time.time,
        after_probe: Callable[[ModelVersion], object] | None = None,
    ) -> None:
        self._versions = versions
        self._interval_of = interval_of
        self._timeout_of = timeout_of
        self._idle_s = idle_s
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._after_probe = after_probe
        self._due: weakref.WeakKeyDictionary[ModelVersion, float] = weakref.WeakKeyDictionary()

    async def run(self) -> None:
        """Probe, sleep until the next version is due, repeat; ends only when cancelled."""
        while True:
            try:
                delay = await self.tick()
            except Exception:  # a bug here must not stop the probes for good
                log.exception("health probe round failed")
                delay = self._idle_s
            await self._sleep(delay)

    async def tick(self) -> float:
        """Probe the versions that are due; seconds until the next one is."""
        now = self._clock()
        due: list[ModelVersion] = []
        next_at = math.inf
        for version in self._versions():
            interval = self._interval_of(version)
            if interval <= 0 or not version.serving:
                continue
            at = self._due.setdefault(version, now + interval)
            if at <= now:
                due.append(version)
                at = self._due[version] = now + interval
            next_at = min(next_at, at)
        # At once: one hung version must not delay the others' probes.
        await asyncio.gather(*(self.probe(v) for v in due))
        return max(0.0, next_at - self._clock()) if next_at < math.inf else self._idle_s

    async def probe(self, version: ModelVersion) -> None:
        breaker = version.breaker
        if not breaker.allow():
            return
        permit = breaker.acquire()
        outcome = await run_probe(version, timeout_s=self._timeout_of(version))
        if outcome.refused:  # a busy version is not a sick one: try again next interval
            permit.release()
            return
        # Our own well-formed request: any error, 4xx included, says the version is unwell.
        if outcome.ok:
            permit.success()
        else:
            permit.failure()
            log.warning("health probe of %s:%s failed: %s", version.name, version.version,
                        outcome.detail)
        version.record_health(outcome.ok, outcome.detail, self._wall_clock())
        if self._after_probe is not None:
            self._after_probe(version)
