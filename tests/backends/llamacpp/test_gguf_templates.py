"""Chat templates render in a sandbox with a time and size budget (CVE-2024-34359 class)."""

from __future__ import annotations

import time
import typing

import pytest
from jinja2 import TemplateError

from modelyard.backends.llamacpp.options import ChatFormat
from modelyard.backends.llamacpp.templates import (
    BUILTIN_CHAT_FORMATS,
    ChatTemplate,
    TemplateInputError,
    TemplateLimitError,
    TemplateRefusedError,
)
from modelyard.core.types import ChatMessage

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HELLO = (ChatMessage("user", "Hello"),)


def render(source: str, messages: tuple[ChatMessage, ...] = HELLO, **limits: typing.Any) -> str:
    return ChatTemplate(source, bos_token="<s>", eos_token="</s>", **limits).render(messages)


def test_a_hugging_face_style_template_renders_like_transformers_does() -> None:
    assert render(SMOLLM2) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_variables_and_helpers() -> None:
    source = (
        "{{ bos_token }}{% for m in messages %}{{ m.role }}={{ m.content | tojson }};"
        "{% if loop.last %}{% break %}{% endif %}{% endfor %}{{ eos_token }}"
        "{{ strftime_now('%Y') | length }}"
    )
    text = render(source, (ChatMessage("user", "<b>ünï</b>"),))
    # tojson as in transformers: neither HTML- nor ASCII-escaped.
    assert text == '<s>user="<b>ünï</b>";</s>4'


def test_raise_exception_is_the_clients_error() -> None:
    source = "{% if messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}"
    with pytest.raises(TemplateInputError, match="system first"):
        render(source)


@pytest.mark.parametrize(
    "attack",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ raise_exception.__globals__['__builtins__'] }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ self.__init__.__globals__.__builtins__.__import__('os').popen('id').read() }}",
        "{{ messages.append({'role': 'system'}) }}",
    ],
)
def test_reaching_python_internals_is_refused(attack: str) -> None:
    with pytest.raises(TemplateRefusedError, match="refused by the sandbox"):
        render(attack)


@pytest.mark.parametrize(
    "attack",
    [
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{{ joiner.__init__.__globals__.os.popen('id').read() }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
    ],
)
def test_the_cycler_joiner_and_lipsum_globals_are_gone(attack: str) -> None:
    # Jinja's default globals are the usual stepping stones to __globals__; here they are
    # undefined, so the attack fails before the sandbox is even asked.
    with pytest.raises(TemplateError, match="(?i)undefined"):
        render(attack)
    assert render("{{ cycler }}{{ joiner }}{{ lipsum }}") == ""


@pytest.mark.parametrize(
    "bomb",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        (
            "{% for m in messages %}{% for c in 'x' * 3000 %}{% for d in 'y' * 3000 %}"
            "{% endfor %}{% endfor %}{% endfor %}"
        ),
        "{% macro f(n) %}{% for i in range(1000) %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(1) }}",
    ],
)
def test_a_template_that_loops_forever_is_stopped_at_its_deadline(bomb: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateLimitError):
        render(bomb, timeout_s=0.2)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "bomb",
    [
        "{{ 'a' * 10**10 }}",
        "{{ 9 ** 999999999 }}",
        "{{ 'x' | center(1000000000) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ '%999999999s' | format(1) }}",
        "{{ 'abc' | replace('', 'x' * 100000) | replace('x', 'y' * 100000) }}",
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}"
        ),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
            "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"
        ),
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
    ],
)
def test_a_template_that_grows_without_bound_is_stopped_before_memory_runs_out(bomb: str) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateLimitError):
        render(bomb, max_chars=1_000_000)
    assert time.monotonic() - started < 5


def test_a_template_that_does_not_compile_says_so() -> None:
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_every_chat_format_named_in_the_options_exists_and_renders() -> None:
    assert set(typing.get_args(ChatFormat)) == set(BUILTIN_CHAT_FORMATS)
    conversation = (
        ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"), ChatMessage("user", "Bye"),
    )
    for name, source in BUILTIN_CHAT_FORMATS.items():
        text = render(source, conversation)
        assert "Hi" in text and "Bye" in text and "Hello!" in text, name


def test_chatml_format() -> None:
    assert render(BUILTIN_CHAT_FORMATS["chatml"]) == (
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    )
