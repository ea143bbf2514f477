"""Fixtures shared by the spine tests: throwaway plugin distributions on ``sys.path``."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modelyard.core.plugins import ALLOW_ENV

#: Redis, Ray and Chromium for the tests that need them (tests/_services.py).
pytest_plugins = ["_services"]

#: ``install(dist, version, modules={name: source}, entry_points={ep_name: "module"})``
InstallPlugin = Callable[..., Path]


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InstallPlugin]:
    """Install tiny plugin distributions (a module and a ``*.dist-info``) into a temp site dir.

    ``importlib.metadata`` finds them exactly as it finds a pip-installed plugin, so the
    ``modelyard`` entry-point group is exercised for real. Imported modules are dropped after.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    imported: list[str] = []

    def install(
        dist: str,
        version: str = "0.1.0",
        *,
        modules: dict[str, str],
        entry_points: dict[str, str],
    ) -> Path:
        for module, source in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            imported.append(module)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        lines = "\n".join(f"{name} = {target}" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[modelyard]\n{lines}\n")
        return info

    try:
        yield install
    finally:
        for module in imported:
            sys.modules.pop(module, None)


TINY_PLUGIN = """
    from modelyard import Backend, Task, hookimpl

    class TinyBackend(Backend):
        name = "tiny"
        tasks = frozenset({Task.EMBEDDINGS})

    @hookimpl
    def register_backends(register):
        register(TinyBackend)
"""

BROKEN_PLUGIN = """
    raise ImportError("tinybroken needs libfoo.so")
"""


@pytest.fixture
def tiny_plugins(install_plugin: InstallPlugin) -> None:
    """One working plugin (backend ``tiny``) and one that fails to import."""
    install_plugin(
        "modelyard-tiny", "1.2.3", modules={"tinyplug": TINY_PLUGIN},
        entry_points={"tiny": "tinyplug"},
    )
    install_plugin(
        "modelyard-broken", "0.0.1", modules={"tinybroken": BROKEN_PLUGIN},
        entry_points={"broken": "tinybroken"},
    )
