"""Everything the docs, README and plugin template import from modelyard is public API."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import modelyard

ROOT = Path(__file__).resolve().parents[1]
#: Subpackages users may import from besides ``modelyard`` itself (each has an ``__all__``).
PUBLIC_MODULES = frozenset({"modelyard", "modelyard.testing", "modelyard.cache"})
_FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _sources() -> list[tuple[str, str]]:
    """(where, python source) for every Python block in the docs and every template file."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for i, block in enumerate(_FENCE.findall(doc.read_text())):
            found.append((f"{doc.relative_to(ROOT)} block {i + 1}", block))
    for path in sorted((ROOT / "plugin-template").rglob("*")):
        if path.suffix in (".py", ".tmpl") and "py" in path.name:
            found.append((str(path.relative_to(ROOT)), path.read_text().replace("$", "_")))
    return found


def _imports(source: str) -> list[tuple[str, str]]:
    """(module, name) for each ``from modelyard... import name``; ``modelyard.X`` uses too."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []  # a fragment with "..." placeholders; nothing importable to check
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("modelyard"):
            pairs += [(node.module or "", alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id == "modelyard"
        ):
            pairs.append(("modelyard", node.attr))
    return pairs


def test_the_docs_and_template_import_something() -> None:
    names = {name for _, source in _sources() for _, name in _imports(source)}
    assert {"hookimpl", "Backend", "PluginHost", "create_app"} <= names


@pytest.mark.parametrize(("where", "source"), _sources(), ids=lambda v: str(v)[:60])
def test_every_imported_name_is_public(where: str, source: str) -> None:
    for module_name, name in _imports(source):
        assert module_name in PUBLIC_MODULES, (
            f"{where}: imports from {module_name}, which is internal; import from modelyard"
        )
        module = importlib.import_module(module_name)
        assert name in module.__all__, f"{where}: {module_name}.{name} is not in __all__"


def test_every_public_name_resolves() -> None:
    for module_name in sorted(PUBLIC_MODULES):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert getattr(module, name) is not None, f"{module_name}.{name}"


def test_the_core_package_exports_nothing_of_its_own() -> None:
    """Core modules are internal: users go through ``modelyard``."""
    core = importlib.import_module("modelyard.core")
    assert core.__all__ == []
    assert "InferenceService" in modelyard.__all__ and "hookimpl" in modelyard.__all__
