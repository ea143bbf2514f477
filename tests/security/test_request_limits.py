"""Request limits per model: 422 past max_tokens, input length or input count; caps."""

from __future__ import annotations

import msgspec
import pytest

from modelyard.core.errors import UnprocessableError
from modelyard.core.limits import LimitSettings, RequestLimits, apply_limits
from modelyard.core.types import (
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerationParams,
    Tensor,
    TensorRequest,
)

LIMITS = msgspec.convert(
    {"max_tokens": 256, "max_input_chars": 100, "max_inputs": 4,
     "models": {"small": {"max_tokens": 16}}},
    LimitSettings,
)


def test_per_model_entries_override_the_defaults() -> None:
    assert LIMITS.for_model("small") == RequestLimits(
        max_tokens=16, max_input_chars=100, max_inputs=4
    )
    assert LIMITS.for_model("other").max_tokens == 256
    assert LimitSettings().for_model("x") == RequestLimits()


def test_max_tokens_over_the_limit_is_422_and_unstated_is_capped() -> None:
    limits = LIMITS.for_model("small")
    with pytest.raises(UnprocessableError, match="max_tokens 17 exceeds model 'small'"):
        apply_limits(limits, "small", CompletionRequest("hi", GenerationParams(max_tokens=17)))
    asked = CompletionRequest("hi", GenerationParams(max_tokens=16))
    assert apply_limits(limits, "small", asked) is asked
    capped = apply_limits(limits, "small", ChatRequest((ChatMessage("user", "hi"),)))
    assert isinstance(capped, ChatRequest) and capped.params.max_tokens == 16


def test_input_length_counts_every_message() -> None:
    limits = LIMITS.for_model("m")
    messages = (ChatMessage("system", "x" * 60), ChatMessage("user", "y" * 41))
    with pytest.raises(UnprocessableError, match="101 characters"):
        apply_limits(limits, "m", ChatRequest(messages))
    assert apply_limits(limits, "m", ChatRequest(messages[:1]))


def test_too_many_inputs_is_422() -> None:
    limits = LIMITS.for_model("m")
    with pytest.raises(UnprocessableError, match="at most 4 inputs"):
        apply_limits(limits, "m", EmbeddingRequest(tuple("abcde")))
    assert apply_limits(limits, "m", EmbeddingRequest(tuple("abcd")))


def test_no_limits_and_tensor_requests_pass_through() -> None:
    request = TensorRequest((Tensor("x", "FP32", (1,), [1.0]),))
    assert apply_limits(LIMITS.for_model("m"), "m", request) is request
    chat = ChatRequest((ChatMessage("user", "z" * 10_000),))
    assert apply_limits(RequestLimits(), "m", chat) is chat


def test_limit_settings_reject_nonsense() -> None:
    with pytest.raises(msgspec.ValidationError, match="max_tokens"):
        msgspec.convert({"max_tokens": 0}, LimitSettings)
    with pytest.raises(msgspec.ValidationError, match="unknown field"):
        msgspec.convert({"models": {"m": {"max_token": 1}}}, LimitSettings)
