"""The conformance kit itself: a correct backend passes; each known bug fails with its reason.

The kit runs as an author runs it: a plugin package installed with an entry point in the
``modelyard`` group, test modules subclassing the kit's classes, and pytest. That pytest runs
in a subprocess (once for the whole module), so the servers, SDKs and plugins it imports never
mix with this process's modules; its JUnit report says how each check ended and why.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

import modelyard.testing.conformance
from modelyard.testing.conformance._auth import find_plain_secret_comparisons
from modelyard.testing.conformance._loop import largest_loop_gap

FAKE_PLUGIN = '''
"""Fake backends: ``good`` keeps the contract, every other one breaks it in one way."""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from pathlib import Path

import msgspec

from modelyard import (
    Backend, BackendError, BackendInfo, ClassificationResult, EmbeddingResult,
    GenerationResult, Label, ModelLoadError, StreamChunk, Task, Tensor, TensorResult,
    TensorSpec, hookimpl,
)


class Model(msgspec.Struct, forbid_unknown_fields=True):
    dim: int
    labels: list[str]
    scale: float


class Options(msgspec.Struct, forbid_unknown_fields=True):
    uppercase: bool = False


def vector(text, dim):
    digest = hashlib.sha256(text.encode()).digest()
    raw = [digest[i % 32] - 127.5 for i in range(dim)]
    norm = math.sqrt(sum(x * x for x in raw))
    return [x / norm for x in raw]


class GoodBackend(Backend):
    name = "good"
    tasks = frozenset(Task)
    options_type = Options
    max_batch_size = 8

    async def load(self):
        try:
            raw = await asyncio.to_thread(Path(self.context.path).read_bytes)
            self.model = msgspec.json.decode(raw, type=Model)
        except OSError as exc:
            raise ModelLoadError(f"cannot read {self.context.source}: {exc.strerror}") from None
        except msgspec.MsgspecError as exc:
            raise ModelLoadError(f"{self.context.source} is not a model: {exc}") from None

    async def unload(self):
        self.model = None

    async def infer(self, batch):
        await asyncio.sleep(0)
        return [self.answer(request) for request in batch]

    def answer(self, request):
        model = self.model
        if request.task == Task.EMBEDDINGS:
            rows = [vector(text, model.dim) for text in request.inputs]
            return EmbeddingResult(rows, prompt_tokens=sum(len(t.split()) for t in request.inputs))
        if request.task == Task.CLASSIFICATION:
            labels = []
            for text in request.inputs:
                scores = sorted(
                    ((vector(text + label, 1)[0] + 1) / 2, label) for label in model.labels
                )[::-1]
                labels.append([Label(label, score) for score, label in scores][: request.top_k])
            return ClassificationResult(labels)
        if request.task == Task.TENSOR:
            (x,) = request.inputs
            data = [float(v) * model.scale for v in x.data]
            return TensorResult([Tensor("OUTPUT0", "FP32", tuple(x.shape), data)])
        prompt = request.prompt if request.task == Task.COMPLETION else request.messages[-1].content
        words = prompt.split()[::-1]
        limit = request.params.max_tokens or len(words)
        finish = "length" if len(words) > limit else "stop"
        text = " ".join(words[:limit])
        if self.options.uppercase:
            text = text.upper()
        return GenerationResult(text, finish, len(prompt.split()), min(len(words), limit))

    async def stream(self, request):
        result = self.answer(request)
        for word in result.text.split():
            await asyncio.sleep(0)
            yield StreamChunk(word + " ")
        yield StreamChunk("", result.finish_reason, result.prompt_tokens,
                          result.completion_tokens)

    def info(self):
        spec = TensorSpec("INPUT0", "FP32", (-1, 3))
        return BackendInfo([spec], [TensorSpec("OUTPUT0", "FP32", (-1, 3))], {}, "fake")


class RowsBug(GoodBackend):
    """One embedding per request, whatever the number of inputs."""

    name = "rows-bug"

    def answer(self, request):
        result = super().answer(request)
        return EmbeddingResult(result.embeddings[:1], result.prompt_tokens)


class CapBug(GoodBackend):
    """Declares 8 but its runtime takes 4 at a time."""

    name = "cap-bug"

    async def infer(self, batch):
        if len(batch) > 4:
            raise BackendError(f"the runtime takes 4 requests at a time, got {len(batch)}")
        return await super().infer(batch)


class BlockingBug(GoodBackend):
    """Runs its model on the event loop."""

    name = "blocking-bug"

    async def infer(self, batch):
        time.sleep(0.3)
        return [self.answer(request) for request in batch]


class NoFinishBug(GoodBackend):
    """Streams text but never says why it stopped."""

    name = "no-finish-bug"

    async def stream(self, request):
        for word in self.answer(request).text.split():
            yield StreamChunk(word + " ")


@hookimpl
def register_backends(register):
    for cls in (GoodBackend, RowsBug, CapBug, BlockingBug, NoFinishBug):
        register(cls)
'''

KIT_TESTS = '''
from pathlib import Path

from modelyard import Task, Tensor, TensorRequest
from modelyard.testing import BackendConformance

MODEL = Path(__file__).parent / "model.json"


class Fake(BackendConformance):
    entry_point = "fakekit"
    source = MODEL
    options = {"uppercase": False}
    embedding_dim = 4
    timeout_s = 20.0

    def tensor_request(self, index):
        data = [float(index + k) for k in range(6)]
        return TensorRequest((Tensor("INPUT0", "FP32", (2, 3), data),))


class TestGood(Fake):
    backend = "good"
    tasks = tuple(Task)


class TestRowsBug(Fake):
    backend = "rows-bug"
    tasks = (Task.EMBEDDINGS,)


class TestCapBug(Fake):
    backend = "cap-bug"
    tasks = (Task.EMBEDDINGS,)


class TestBlockingBug(Fake):
    backend = "blocking-bug"
    tasks = (Task.EMBEDDINGS,)


class TestNoFinishBug(Fake):
    backend = "no-finish-bug"
    tasks = (Task.COMPLETION,)


class TestEntryPointTypo(Fake):
    entry_point = "fakekit_typo"
    backend = "good"
    tasks = (Task.COMPLETION,)
'''

BUGGY_PLUGINS = '''
import pickle

import msgspec

from modelyard import (
    AuthProvider, CacheTier, Credentials, ModelLoadError, Principal, SourceScheme,
    UnauthorizedError,
)


class Budget(msgspec.Struct, forbid_unknown_fields=True):
    max_bytes: int = 1 << 20
    ttl_s: float | None = None


class DictTier(CacheTier):
    name = "dict"
    options_type = Budget

    def __init__(self, options, *, clock=None):
        super().__init__(options)
        self.entries = {}

    async def get(self, key):
        return self.entries.get(key)

    async def set(self, key, value):
        self.entries[key] = value

    async def delete(self, key):
        self.entries.pop(key, None)

    async def clear(self):
        self.entries.clear()


class PicklingTier(DictTier):
    async def set(self, key, value):
        self.entries[key] = value if isinstance(value, bytes) else pickle.dumps(value)


class GreedyProvider(AuthProvider):
    """Claims every credential, its own kind or not."""

    name = "greedy"

    async def authenticate(self, credentials):
        if credentials.token.startswith("let-me-in"):
            return Principal("alice", frozenset({"user"}))
        raise UnauthorizedError("bad credential")


class VagueScheme(SourceScheme):
    name = "vague"

    def resolve(self, reference, *, cache_dir, progress):
        raise ModelLoadError("not found")
'''

PLAIN_COMPARE = '''
from modelyard import AuthProvider, Principal, UnauthorizedError


class PlainCompareProvider(AuthProvider):
    name = "plain"

    async def authenticate(self, credentials):
        if credentials.scheme != "Token":
            return None
        if credentials.token != "s3cret-value":
            raise UnauthorizedError("bad token")
        return Principal("alice", frozenset({"user"}))
'''

OTHER_KITS = '''
from modelyard import Credentials
from modelyard.testing import (
    AuthProviderConformance, CacheTierConformance, SourceSchemeConformance,
)

from buggy import DictTier, GreedyProvider, PicklingTier, VagueScheme
from plaincompare import PlainCompareProvider


class TestForgetfulTtl(CacheTierConformance):
    tier = DictTier
    options = {"ttl_s": 60}
    ttl_s = 60.0


class TestUnbounded(CacheTierConformance):
    tier = DictTier
    options = {"max_bytes": 4096}
    max_bytes = 4096


class TestPickling(CacheTierConformance):
    tier = PicklingTier


class TestGreedy(AuthProviderConformance):
    provider = GreedyProvider
    compares_secrets = False

    def valid_credentials(self, provider):
        return Credentials("Bearer", "let-me-in")

    def invalid_credentials(self, provider):
        return [Credentials("Bearer", "nope")]


class TestPlainCompare(AuthProviderConformance):
    provider = PlainCompareProvider

    def valid_credentials(self, provider):
        return Credentials("Token", "s3cret-value")

    def invalid_credentials(self, provider):
        return [Credentials("Token", "wrong")]


class TestVague(SourceSchemeConformance):
    scheme = VagueScheme
    unknown_references = ("bucket/missing.onnx",)
'''


#: The checks each buggy class must fail; the correct backend runs every check.
SELECTION = " or ".join([
    "TestGood",
    "(TestRowsBug and one_per_request)",
    "(TestCapBug and max_batch_size)",
    "(TestBlockingBug and event_loop)",
    "(TestNoFinishBug and stream)",
    "(TestEntryPointTypo and entry_point)",
    "test_others",
])


@dataclass
class KitRun:
    """How each check of the inner run ended: ``outcomes[test id] = (outcome, message)``."""

    outcomes: dict[str, tuple[str, str]]
    output: str

    def of_class(self, cls: str) -> dict[str, tuple[str, str]]:
        return {k: v for k, v in self.outcomes.items() if k.split("::")[1] == cls}

    def failure(self, test: str) -> str:
        outcome, message = self.outcomes.get(test, ("missing", ""))
        assert outcome == "failed", f"{test}: {outcome}\n{self.output}"
        return message


def _install_fake_plugin(site: Path) -> None:
    """A module plus the dist-info that puts it in the ``modelyard`` entry-point group."""
    site.mkdir()
    (site / "fakekit.py").write_text(FAKE_PLUGIN)
    info = site / "modelyard_fakekit-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: modelyard-fakekit\nVersion: 0.1.0\n"
    )
    (info / "entry_points.txt").write_text("[modelyard]\nfakekit = fakekit\n")


@pytest.fixture(scope="module")
def kit_run(tmp_path_factory: pytest.TempPathFactory) -> KitRun:
    root = tmp_path_factory.mktemp("kit")
    _install_fake_plugin(root / "site")
    (root / "model.json").write_text(
        '{"dim": 4, "labels": ["negative", "neutral", "positive"], "scale": 2.0}'
    )
    for name, text in {
        "test_kit.py": KIT_TESTS, "buggy.py": BUGGY_PLUGINS, "plaincompare.py": PLAIN_COMPARE,
        "test_others.py": OTHER_KITS,
    }.items():
        (root / name).write_text(text)
    (root / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings =\n    ignore::DeprecationWarning\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root / "site"), str(root)])
    env.pop("MODELYARD_PLUGINS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-k", SELECTION,
         "--junitxml", str(root / "report.xml"), "test_kit.py", "test_others.py"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    outcomes = {}
    for case in ET.parse(root / "report.xml").getroot().iter("testcase"):
        module, _, cls = case.get("classname", "").partition(".")
        test = f"{module}.py::{cls}::{case.get('name')}"
        found = [child for child in case if child.tag in ("failure", "error", "skipped")]
        if found:
            outcome = {"failure": "failed"}.get(found[0].tag, found[0].tag)
            outcomes[test] = (outcome, found[0].get("message", ""))
        else:
            outcomes[test] = ("passed", "")
    return KitRun(outcomes, result.stdout + result.stderr)


def test_a_correct_backend_passes_every_check_for_every_task(kit_run: KitRun) -> None:
    good = kit_run.of_class("TestGood")
    # 3 checks once, 10 per task (the 2 stream checks skipped for the 3 non-generation tasks).
    assert len(good) == 53, kit_run.output
    assert [k for k, (o, _) in good.items() if o not in ("passed", "skipped")] == []
    skipped = sorted(k for k, (o, _) in good.items() if o == "skipped")
    assert len(skipped) == 6 and all("stream" in k for k in skipped)


def test_wrong_rows_per_input_fail_with_the_counts(kit_run: KitRun) -> None:
    message = kit_run.failure(
        "test_kit.py::TestRowsBug::test_results_come_back_one_per_request_in_order[embeddings]"
    )
    assert "returned 1 embedding for 2 inputs" in message


def test_a_batch_cap_the_backend_cannot_take_fails_as_exceeded(kit_run: KitRun) -> None:
    message = kit_run.failure(
        "test_kit.py::TestCapBug::test_max_batch_size_is_honoured[embeddings]"
    )
    assert "max_batch_size exceeded: the backend declares max_batch_size = 8 but failed a " \
        "batch of 8" in message
    assert "the runtime takes 4 requests at a time" in message


def test_a_blocking_infer_fails_with_how_long_it_held_the_loop(kit_run: KitRun) -> None:
    message = kit_run.failure(
        "test_kit.py::TestBlockingBug::test_infer_does_not_block_the_event_loop[embeddings]"
    )
    assert "infer blocked the event loop for 3" in message  # ~300 ms: time.sleep(0.3)
    assert "(limit 50 ms + 50 ms tolerance)" in message


def test_a_stream_without_finish_reason_fails_saying_so(kit_run: KitRun) -> None:
    # Both stream checks notice: the plain stream, and the streams after early closes.
    for test in ("test_stream_ends_with_finish_reason_and_token_counts[completion]",
                 "test_closing_a_stream_early_frees_its_slot[completion]"):
        message = kit_run.failure(f"test_kit.py::TestNoFinishBug::{test}")
        assert "stream ended without finish_reason" in message


def test_a_misspelled_entry_point_fails_naming_it_and_the_group(kit_run: KitRun) -> None:
    message = kit_run.failure("test_kit.py::TestEntryPointTypo::test_entry_point_is_found")
    assert "entry point 'fakekit_typo' not found in group 'modelyard' (installed: " in message
    assert "fakekit" in message.split("installed:")[1]


def test_the_other_kits_fail_plugins_that_break_their_contract(kit_run: KitRun) -> None:
    expected = {
        "TestForgetfulTtl::test_entries_expire_after_their_ttl":
            "an entry was still served 90 s after it was set with a TTL of 60 s",
        "TestUnbounded::test_the_size_bound_holds": "with max_bytes = 4096",
        "TestPickling::test_values_are_bytes_never_pickled":
            "the tier pickled a value that is not bytes",
        "TestGreedy::test_a_foreign_credential_gives_none":
            "a Basic credential of another kind was refused",
        "TestPlainCompare::test_secrets_are_compared_in_constant_time":
            "compares a secret with ==/!= (credentials.token != 's3cret-value')",
        "TestVague::test_an_unknown_reference_raises_model_load_error_naming_it":
            "failed with 'not found', which does not name the reference 'bucket/missing.onnx'",
    }
    for test, text in expected.items():
        assert text in kit_run.failure(f"test_others.py::{test}"), test
    failed = [k for k, (o, _) in kit_run.outcomes.items()
              if k.startswith("test_others.py") and o != "passed" and o != "skipped"]
    assert sorted(failed) == sorted(f"test_others.py::{t}" for t in expected)


# -- the kit's building blocks -----------------------------------------------------------


async def test_the_loop_gap_sees_a_blocking_call_and_not_an_awaiting_one() -> None:
    import asyncio
    import time

    async def blocking() -> None:
        time.sleep(0.2)

    async def awaiting() -> None:
        await asyncio.sleep(0.2)

    assert await largest_loop_gap(blocking) >= 0.2
    assert await largest_loop_gap(awaiting) < 0.1


def test_plain_comparisons_of_secrets_are_found() -> None:
    source = textwrap.dedent(
        """
        def check(given, stored, key):
            if given.api_key == stored:
                return True
            if hmac.compare_digest(given.secret, stored):
                return True
            if len(stored.digest) != 32 or key.scheme == "bearer" or key.token is None:
                return False
            if key.password == "hunter2":
                return True
            return expected_token != given
        """
    )
    found = [line for line, _ in find_plain_secret_comparisons(source)]
    assert found == [3, 9, 11]


def test_the_kit_is_importable_from_modelyard_testing() -> None:
    import modelyard.testing as testing

    for name in ("BackendConformance", "CacheTierConformance", "AuthProviderConformance",
                 "SourceSchemeConformance"):
        assert name in testing.__all__
        assert getattr(testing, name) is getattr(modelyard.testing.conformance, name)
