"""Keys: every field counts, the encoding is unambiguous, only deterministic requests qualify."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelyard.cache.keys import (
    KEY_SCHEMA,
    KeyFields,
    cache_key,
    derive_secrets,
    encode_fields,
    is_cacheable,
    load_or_create_secret,
    request_fields,
    weights_digest,
)
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationParams,
    Tensor,
    TensorRequest,
)

SECRET = derive_secrets(b"test secret")[0]
FIELD_NAMES = KeyFields.__struct_fields__
text = st.text(max_size=12)
blob = st.binary(max_size=12)


@st.composite
def key_fields(draw: st.DrawFn) -> KeyFields:
    values = {
        name: draw(blob if name in ("params", "input") else text) for name in FIELD_NAMES
    }
    return KeyFields(**values)


def _decode_fields(encoded: bytes) -> list[bytes]:
    """The inverse of encode_fields: it exists, so the encoding is injective."""
    assert encoded.startswith(KEY_SCHEMA)
    rest, out = encoded[len(KEY_SCHEMA):], []
    while rest:
        n = int.from_bytes(rest[:8], "big")
        out.append(rest[8: 8 + n])
        rest = rest[8 + n:]
    return out


@given(key_fields(), st.sampled_from(FIELD_NAMES), st.data())
def test_changing_any_one_field_changes_the_key(
    fields: KeyFields, name: str, data: st.DataObject
) -> None:
    old = getattr(fields, name)
    new = data.draw((blob if isinstance(old, bytes) else text).filter(lambda v: v != old))
    changed = msgspec.structs.replace(fields, **{name: new})
    assert cache_key(SECRET, changed) != cache_key(SECRET, fields)


@given(key_fields())
def test_the_encoding_is_length_prefixed_and_decodes_back(fields: KeyFields) -> None:
    decoded = _decode_fields(encode_fields(fields))
    expected = [
        v if isinstance(v, bytes) else v.encode() for v in (getattr(fields, n) for n in FIELD_NAMES)
    ]
    assert decoded == expected


@given(text, text, text)
def test_moving_characters_between_adjacent_fields_changes_the_key(a: str, b: str, c: str) -> None:
    base = KeyFields(
        model="", version="", weights_digest="", backend="", backend_version="", tenant="",
        generation="", task="", params=b"", input=b"",
    )
    left = msgspec.structs.replace(base, model=a + b, version=c)
    right = msgspec.structs.replace(base, model=a, version=b + c)
    if b:
        assert cache_key(SECRET, left) != cache_key(SECRET, right)


def test_the_classic_ambiguity_is_gone() -> None:
    base = {"weights_digest": "w", "backend": "b", "backend_version": "1", "tenant": "t",
                "generation": "/", "task": "completion", "params": b"", "input": b""}
    ab_c = KeyFields(model="ab", version="c", **base)  # type: ignore[arg-type]
    a_bc = KeyFields(model="a", version="bc", **base)  # type: ignore[arg-type]
    assert cache_key(SECRET, ab_c) != cache_key(SECRET, a_bc)


def test_the_secret_keys_the_hash() -> None:
    fields = KeyFields(
        model="m", version="1", weights_digest="w", backend="b", backend_version="1", tenant="",
        generation="/", task="completion", params=b"", input=b"x",
    )
    other = derive_secrets(b"another secret")[0]
    assert cache_key(SECRET, fields) != cache_key(other, fields)
    assert len(cache_key(SECRET, fields)) == 32


# -- requests ------------------------------------------------------------------------------

GREEDY = GenerationParams(temperature=0.0, max_tokens=8)


def test_only_deterministic_generation_is_cacheable() -> None:
    assert is_cacheable(CompletionRequest("hi", GREEDY))
    assert is_cacheable(CompletionRequest("hi", GenerationParams(temperature=0.8, seed=7)))
    assert not is_cacheable(CompletionRequest("hi", GenerationParams(temperature=0.8)))
    assert not is_cacheable(ChatRequest((ChatMessage("user", "hi"),)))
    assert is_cacheable(EmbeddingRequest(("hi",)))
    assert is_cacheable(ClassificationRequest(("hi",)))
    assert is_cacheable(TensorRequest((Tensor("INPUT0", "FP32", (1, 1), [1.0]),)))


def test_parameter_spelling_that_means_the_same_gives_one_key() -> None:
    a = GenerationParams(temperature=-0.0, stop=("b", "a", "a"), logit_bias={2: 1.0, 1: -1.0})
    b = GenerationParams(temperature=0.0, stop=("a", "b"), logit_bias={1: -1.0, 2: 1.0})
    assert request_fields(CompletionRequest("p", a)) == request_fields(CompletionRequest("p", b))


def test_every_parameter_counts() -> None:
    base = request_fields(CompletionRequest("p", GREEDY))
    for change in [
        {"max_tokens": 9}, {"seed": 1}, {"top_p": 0.5}, {"top_k": 3}, {"stop": ("x",)},
        {"presence_penalty": 0.1}, {"frequency_penalty": 0.1}, {"logit_bias": {1: 1.0}},
        {"temperature": 0.5},
    ]:
        params = msgspec.structs.replace(GREEDY, **change)
        assert request_fields(CompletionRequest("p", params)) != base, change


def test_task_and_input_shape_count() -> None:
    chat = ChatRequest((ChatMessage("user", "p"),), GREEDY)
    completion = CompletionRequest("p", GREEDY)
    assert request_fields(chat)[0] != request_fields(completion)[0]
    # Message boundaries are kept: ("ab","c") and ("a","bc") are different conversations.
    one = ChatRequest((ChatMessage("user", "ab"), ChatMessage("user", "c")), GREEDY)
    two = ChatRequest((ChatMessage("user", "a"), ChatMessage("user", "bc")), GREEDY)
    assert request_fields(one) != request_fields(two)
    assert request_fields(ClassificationRequest(("x",), top_k=1)) != request_fields(
        ClassificationRequest(("x",), top_k=2)
    )
    t1 = TensorRequest((Tensor("INPUT0", "FP32", (1, 2), [1.0, 2.0]),))
    t2 = TensorRequest((Tensor("INPUT0", "FP32", (2, 1), [1.0, 2.0]),))
    assert request_fields(t1) != request_fields(t2)


def test_numpy_tensor_data_keys_like_its_list() -> None:
    np = pytest.importorskip("numpy")
    as_list = TensorRequest((Tensor("INPUT0", "FP32", (1, 2), [1.0, 2.0]),))
    as_array = TensorRequest((Tensor("INPUT0", "FP32", (1, 2), np.array([1.0, 2.0])),))
    assert request_fields(as_list) == request_fields(as_array)


# -- secret and digests --------------------------------------------------------------------


def test_the_generated_secret_is_0600_and_stable(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        first = load_or_create_secret(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600
    assert len(first) == 32
    assert load_or_create_secret(tmp_path) == first


def test_a_loose_secret_file_is_tightened(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(os.urandom(32))
    os.chmod(tmp_path / "secret", 0o644)
    load_or_create_secret(tmp_path)
    assert stat.S_IMODE((tmp_path / "secret").stat().st_mode) == 0o600


def test_weights_digest_follows_replacement_and_names(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "model.onnx").write_bytes(b"weights")
    (model / "sub" / "empty.txt").write_bytes(b"")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_bytes(b"ignored")
    first = weights_digest(model)
    assert weights_digest(model) == first
    (model / ".git" / "HEAD").write_bytes(b"still ignored")
    assert weights_digest(model) == first
    replacement = tmp_path / "new.onnx"
    replacement.write_bytes(b"weightz")
    os.replace(replacement, model / "model.onnx")  # same name and size, new file
    assert weights_digest(model) != first
    (model / "sub" / "empty.txt").rename(model / "sub" / "renamed.txt")
    assert weights_digest(model) != first
    single = tmp_path / "one.gguf"
    single.write_bytes(b"gguf")
    assert weights_digest(single) != weights_digest(model)


def test_weights_digest_can_hash_content(tmp_path: Path) -> None:
    model = tmp_path / "model.gguf"
    model.write_bytes(b"aaaa")
    stat_before = os.stat(model)
    quick, full = weights_digest(model), weights_digest(model, content=True)
    assert quick != full
    model.write_bytes(b"bbbb")  # same size; put the old times back: only content tells
    os.utime(model, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    assert weights_digest(model) == quick
    assert weights_digest(model, content=True) != full
