"""Chat templates rendered in a sandbox with a time and size budget.

A GGUF file carries its chat template as Jinja source, and a model file is not trusted code:
rendering it in a plain ``jinja2.Environment`` is how CVE-2024-34359 ran shell commands from a
model download. Templates here render in Jinja2's ``ImmutableSandboxedEnvironment`` (no
``__class__``/``__globals__`` walks, no mutation of lists or dicts) without the ``cycler``,
``joiner`` and ``lipsum`` globals, and under a budget: every loop iteration, call, attribute
access, concatenation and filter checks a deadline, and text that grows past ``max_chars`` is
refused before it is built where the size is known in advance (``*``, ``**``, ``range``).

Who is to blame decides the status. A conversation too large for the budget is the client's
(``TemplateInputError``, 400): the messages may fill half of ``max_chars``, counting
``_MESSAGE_ALLOWANCE`` characters per message for the template's own markup. A template that
outgrows the budget on a conversation within that is the model file's
(``TemplateOverrunError``, a 5xx the circuit breaker counts and failover routes around), and
a client cannot cause one to take a healthy model out of service. Running out of time stays
the client's (``TemplateLimitError``): render time grows with the conversation and the CPU.
"""

from __future__ import annotations

import datetime
import functools
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, cast

from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.ext import loopcontrols
from jinja2.filters import do_format
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from modelyard.core.types import ChatMessage

__all__ = [
    "BUILTIN_CHAT_FORMATS",
    "ChatTemplate",
    "TemplateInputError",
    "TemplateLimitError",
    "TemplateOverrunError",
    "TemplateRefusedError",
]

_ITER_CHECK_EVERY = 64
_DIGITS = re.compile(r"\d{4,}")
_MAX_EXPONENT_BITS = 4096
#: Characters of markup a template may add per message (role tags, separators).
_MESSAGE_ALLOWANCE = 64


class TemplateInputError(TemplateError):
    """The template rejected the conversation (``raise_exception``): the client's to fix."""


class TemplateLimitError(TemplateError):
    """Rendering ran past its time or size budget."""


class TemplateOverrunError(TemplateLimitError):
    """The template built (or was about to build) text, a range or a number past the size
    budget from a conversation that fits it: the model file's fault, not the client's."""


class TemplateRefusedError(TemplateError):
    """The sandbox refused something the template tried (an unsafe attribute or call)."""


class _Budget:
    def __init__(self, timeout_s: float, max_chars: int) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self.max_chars = max_chars

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"chat template took longer than {self.timeout_s:g}s")

    def size(self, n: int, what: str = "text") -> None:
        if n > self.max_chars:
            raise TemplateOverrunError(
                f"chat template {what} would exceed {self.max_chars} characters"
            )


class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """The immutable sandbox plus a per-render budget checked at every hook Jinja offers."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(
            extensions=[loopcontrols], trim_blocks=True, lstrip_blocks=True, autoescape=False,
            keep_trailing_newline=False,
            # Constant folding would run filters such as center(10**9) at compile time,
            # outside any budget.
            optimized=False,
        )
        self._local = threading.local()
        # Jinja evaluates constant expressions while compiling, outside any render: those
        # get the size limit too (a refusal there just defers the expression to render time).
        self._compile_budget = _Budget(float("inf"), max_chars)
        for unsafe in ("cycler", "joiner", "lipsum"):
            self.globals.pop(unsafe, None)
        self.globals["range"] = self._range
        self.globals["__budget_iter"] = self._iter
        self.globals["__budget_text"] = self._text
        self.filters = {name: self._budgeted_filter(fn) for name, fn in self.filters.items()}
        self.filters["tojson"] = _tojson
        self.filters["replace"] = self._replace
        self.filters["format"] = self._format_filter

    @property
    def budget(self) -> _Budget:
        return getattr(self._local, "budget", None) or self._compile_budget

    def with_budget(self, budget: _Budget) -> _BudgetScope:
        return _BudgetScope(self._local, budget)

    # -- hooks the sandbox calls ---------------------------------------------------------

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.budget.tick()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.budget.tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            self._check_widths(value.__self__)
        return wrapped

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = self.budget
        budget.tick()
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(times, int):
                    budget.size(len(seq) * times)
        elif (
            operator == "**" and isinstance(left, int) and isinstance(right, int)
            and right > 0 and right * abs(left).bit_length() > _MAX_EXPONENT_BITS
        ):
            raise TemplateOverrunError("chat template computes a number too large")
        result = super().call_binop(context, operator, left, right)
        if operator == "+" and isinstance(result, str | list | tuple):
            budget.size(len(result))
        return result

    # -- budgeted globals and filters ----------------------------------------------------

    def _range(self, *args: int) -> Iterator[int]:
        numbers = range(*args)
        self.budget.size(len(numbers), "range")
        return self._iter(numbers)

    def _iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        budget = self.budget
        for count, item in enumerate(iterable):
            if count % _ITER_CHECK_EVERY == 0:
                budget.tick()
            yield item

    def _text(self, value: Any) -> Any:
        if isinstance(value, str):
            self.budget.size(len(value))
        return value

    def _replace(self, value: Any, old: str, new: str, count: int | None = None) -> str:
        text = str(value)
        hits = text.count(old) if old else len(text) + 1
        if count is not None and count >= 0:
            hits = min(hits, count)
        self.budget.size(len(text) + hits * max(0, len(new) - len(old)))
        return text.replace(old, new, -1 if count is None else count)

    def _format_filter(self, value: Any, *args: Any, **kwargs: Any) -> str:
        self._check_widths(str(value))
        return str(do_format(value, *args, **kwargs))

    def _check_widths(self, fmt: str) -> None:
        # A field width (``{:>999999999}``, ``%999999999s``) sizes the result before it exists.
        for digits in _DIGITS.findall(fmt):
            self.budget.size(int(digits), "format width")

    def _budgeted_filter(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            budget = self.budget
            budget.tick()
            for value in (*args, *kwargs.values()):
                # Widths and counts (center, indent, truncate, wordwrap) size the result.
                if isinstance(value, int) and not isinstance(value, bool):
                    budget.size(abs(value), "filter argument")
            result = fn(*args, **kwargs)
            if isinstance(result, str):
                budget.size(len(result))
            return result

        return checked


class _BudgetScope:
    def __init__(self, local: threading.local, budget: _Budget) -> None:
        self._local = local
        self._budget = budget

    def __enter__(self) -> _Budget:
        self._local.budget = self._budget
        return self._budget

    def __exit__(self, *exc: object) -> None:
        self._local.budget = None


class _InsertBudgetChecks(NodeTransformer):
    """Route every loop iterable and every ``~`` concatenation through the budget."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _budget_call("__budget_iter", node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _budget_call("__budget_text", node)


def _budget_call(name: str, arg: nodes.Node) -> nodes.Call:
    call = nodes.Call(nodes.Name(name, "load"), [cast(nodes.Expr, arg)], [], None, None)
    call.set_lineno(arg.lineno or 1)
    return call


def _tojson(value: Any, indent: int | None = None) -> str:
    # Hugging Face's tojson: no HTML escaping and no ASCII escaping, unlike Jinja's own.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise TemplateInputError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(str(fmt))


class ChatTemplate:
    """One compiled chat template; ``render`` may run concurrently from several threads."""

    def __init__(
        self,
        source: str,
        *,
        bos_token: str = "",
        eos_token: str = "",
        timeout_s: float = 1.0,
        max_chars: int = 4_000_000,
    ) -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.timeout_s = timeout_s
        self.max_chars = max_chars
        self._env = _BudgetedEnvironment(max_chars)
        try:
            tree = self._env.parse(source)
        except TemplateSyntaxError as exc:
            raise ValueError(
                f"chat template does not compile: {exc.message} (line {exc.lineno})"
            ) from None
        tree = _InsertBudgetChecks().visit(tree)
        code = self._env.compile(tree)
        self._template = self._env.template_class.from_code(
            self._env, code, self._env.make_globals(None)
        )

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The prompt text; raises a ``TemplateError`` subclass saying why it could not."""
        self._check_input(messages)
        variables = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "raise_exception": _raise_exception,
            "strftime_now": _strftime_now,
        }
        with self._env.with_budget(_Budget(self.timeout_s, self.max_chars)) as budget:
            try:
                return self._generate(variables, budget)
            except SecurityError as exc:
                raise TemplateRefusedError(f"chat template refused by the sandbox: {exc}") from None
            except TemplateError:
                raise
            except RecursionError:
                raise TemplateOverrunError("chat template recursed too deep") from None
            except MemoryError:
                raise TemplateLimitError("chat template ran out of memory") from None
            except Exception as exc:  # noqa: BLE001 - a model's template may fail any way it likes
                raise TemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None

    def _check_input(self, messages: Sequence[ChatMessage]) -> None:
        """Refuse a conversation too large for the budget before the template sees it."""
        size = sum(len(m.role) + len(m.content) + _MESSAGE_ALLOWANCE for m in messages)
        if size > self.max_chars // 2:
            raise TemplateInputError(
                f"the conversation is too long for this model's chat template ({len(messages)} "
                f"message(s) count as {size} characters; at most {self.max_chars // 2})"
            )

    def _generate(self, variables: dict[str, Any], budget: _Budget) -> str:
        parts: list[str] = []
        total = 0
        for piece in self._template.generate(variables):
            total += len(piece)
            budget.size(total)
            budget.tick()
            parts.append(piece)
        return "".join(parts)


#: Named formats for ``chat_format`` when a GGUF file has no template (or to override it).
BUILTIN_CHAT_FORMATS: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "llama-2": (
        "{{ bos_token }}{% set ns = namespace(sys='') %}"
        "{% for m in messages %}{% if m.role == 'system' %}"
        "{% set ns.sys = '<<SYS>>\n' ~ m.content ~ '\n<</SYS>>\n\n' %}"
        "{% elif m.role == 'user' %}[INST] {{ ns.sys }}{{ m.content }} [/INST]{% set ns.sys = '' %}"
        "{% else %} {{ m.content }} {{ eos_token }}{{ bos_token }}{% endif %}{% endfor %}"
    ),
    "llama-3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
        "\n\n{{ m.content | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "gemma": (
        "{{ bos_token }}{% set ns = namespace(sys='') %}{% for m in messages %}"
        "{% if m.role == 'system' %}{% set ns.sys = m.content ~ '\n\n' %}{% else %}"
        "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ ns.sys }}{{ m.content | trim }}<end_of_turn>\n{% set ns.sys = '' %}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    ),
    "mistral-instruct": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}"
        "{% else %}{{ m.content }}\n\n{% endif %}{% endfor %}"
    ),
    "phi-3": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    "zephyr": (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
}
