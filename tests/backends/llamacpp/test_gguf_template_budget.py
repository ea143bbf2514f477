"""Who a chat template's size budget blames: the model file (5xx) or the conversation (400)."""

from __future__ import annotations

import pytest
from gguf_testing import MakeGGUF, loaded

from modelyard.backends.llamacpp.templates import (
    ChatTemplate,
    TemplateInputError,
    TemplateLimitError,
    TemplateOverrunError,
)
from modelyard.core.errors import BackendError, BadRequestError
from modelyard.core.types import ChatMessage, ChatRequest, GenerationParams, Task

HELLO = (ChatMessage("user", "Hello"),)
GREEDY = GenerationParams(max_tokens=4, temperature=0.0)
#: The model file's template asks for a range larger than the budget: the issue's example.
RANGE_BOMB = "{% for i in range(10**8) %}{% endfor %}{{ messages[0].content }}"


@pytest.mark.parametrize(
    "bomb",
    [
        RANGE_BOMB,
        "{{ 'a' * 10**10 }}",
        "{{ 9 ** 999999999 }}",
        "{{ 'x' | center(1000000000) }}",
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    ],
)
def test_a_template_that_outgrows_its_budget_is_the_model_files_fault(bomb: str) -> None:
    with pytest.raises(TemplateOverrunError):
        ChatTemplate(bomb, max_chars=1_000_000).render(HELLO)


def test_a_conversation_too_large_for_the_budget_is_the_clients_fault() -> None:
    template = ChatTemplate("{% for m in messages %}{{ m.content }}{% endfor %}", max_chars=4096)
    with pytest.raises(TemplateInputError, match="conversation is too long"):
        template.render((ChatMessage("user", "x" * 3000),))
    # Many short messages count their markup too: no flood of empty messages gets through.
    with pytest.raises(TemplateInputError):
        template.render(tuple(ChatMessage("user", "") for _ in range(40)))
    assert template.render((ChatMessage("user", "x" * 1000),)) == "x" * 1000


def test_running_out_of_time_stays_a_limit_not_an_overrun() -> None:
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TemplateLimitError) as raised:
        ChatTemplate(slow, timeout_s=0.05).render(HELLO)
    assert not isinstance(raised.value, TemplateOverrunError)


async def test_the_backend_answers_a_template_overrun_with_a_backend_error(
    make_gguf: MakeGGUF,
) -> None:
    path = make_gguf("tiny-range-bomb", chat_template=RANGE_BOMB)
    async with loaded(path, Task.CHAT) as backend:
        (result,) = await backend.infer([ChatRequest(HELLO, GREEDY)])
        huge = ChatRequest((ChatMessage("user", "x" * 2_100_000),), GREEDY)
        (refused,) = await backend.infer([huge])
    # A 5xx: the breaker counts it and an alias fails over to its next target.
    assert isinstance(result, BackendError)
    assert result.status_code >= 500
    assert result.detail == "gguf file: chat template range would exceed 4000000 characters"
    # A conversation past the budget is still the client's.
    assert isinstance(refused, BadRequestError)
    assert "conversation is too long" in refused.detail
