"""Turn a model ``source`` (path, ``pypi:``, ``demo:``) into a local path."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from modelyard.core.errors import ModelLoadError

__all__ = ["Progress", "SourceResolver", "resolve_source"]

#: ``progress(phase, percent)``: phase names the step, percent runs 0-100.
Progress = Callable[[str, float], None]
SourceResolver = Callable[[str, Path, Progress], Path]


def resolve_source(source: str, cache_dir: Path, progress: Progress) -> Path:
    """Resolve ``source`` to an existing path, preparing demo models on first use."""
    scheme, sep, rest = source.partition(":")
    if sep and scheme == "pypi":
        return _installed_package_file(rest)
    if sep and scheme == "demo":
        from modelyard import demo  # demo preparation pulls optional packages

        return demo.prepare(rest, cache_dir, progress)
    if sep and scheme == "file":
        source = rest
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model source {source!r} does not exist")
    return path.resolve()


def _installed_package_file(spec: str) -> Path:
    """``pypi:PACKAGE/relative/path``: a file shipped inside an installed package."""
    package, _, relative = spec.partition("/")
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
        raise ModelLoadError(f"source {spec!r} leaves the package directory")
    if not path.exists():
        raise ModelLoadError(f"package {package!r} has no file {relative!r}")
    return path
