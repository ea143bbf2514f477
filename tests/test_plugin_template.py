"""The plugin template renders a package that installs, is discovered, and passes its tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("template")
    pkg = work / "modelyard-reverser"
    subprocess.run(
        [sys.executable, str(ROOT / "plugin-template" / "render.py"), "--name", "reverser",
         "--out", str(pkg)], check=True, capture_output=True,
    )
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(pkg)], check=True, capture_output=True,
    )
    return pkg, site


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MODELYARD_PLUGINS", None)
    return env


def test_rendered_plugin_is_discovered_through_its_entry_point(
    installed_plugin: tuple[Path, Path],
) -> None:
    _, site = installed_plugin
    out = subprocess.run(
        [sys.executable, "-m", "modelyard", "plugins", "--json"],
        env=_env(site),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    records = {r["name"]: r for r in json.loads(out)}
    assert records["reverser"]["status"] == "loaded"
    assert records["reverser"]["backends"] == ["reverser"]
    assert records["reverser"]["source"] == "modelyard-reverser"


def test_rendered_plugin_passes_its_own_tests(installed_plugin: tuple[Path, Path]) -> None:
    pkg, site = installed_plugin
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(pkg / "tests")],
        env=_env(site),
        capture_output=True,
        text=True,
        cwd=pkg,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
