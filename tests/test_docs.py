"""Docs stay true: every hookspec is documented under its exact signature."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from modelyard.core import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _signature(func: object) -> str:
    sig = inspect.signature(func)  # annotations stay strings (from __future__ import annotations)
    params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
    return f"{func.__name__}({params}) -> {sig.return_annotation}"


def _hookspecs() -> list[object]:
    return [
        f for _, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(f, f"{hookspecs.PROJECT}_spec")
    ]


def test_every_hookspec_is_documented_with_its_exact_signature() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### `(.+)`$", text, flags=re.MULTILINE))
    specs = _hookspecs()
    assert len(specs) >= 6
    missing = [_signature(f) for f in specs if _signature(f) not in headings]
    assert not missing, f"undocumented or stale hookspecs in docs/plugins.md: {missing}"


def test_every_hookspec_has_a_one_line_docstring() -> None:
    for func in _hookspecs():
        doc = inspect.getdoc(func) or ""
        assert doc and "\n" not in doc.strip(), func


def test_documented_hooks_all_exist() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text()
    documented = {h.split("(")[0] for h in re.findall(r"^### `(.+)`$", text, flags=re.MULTILINE)}
    assert documented == {f.__name__ for f in _hookspecs()}
