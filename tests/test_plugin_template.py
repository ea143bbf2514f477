"""The plugin template renders, for every task, a package that installs, is discovered through
its entry point, and passes its tests (the conformance kit) with no edits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("embeddings", "classification", "chat", "completion", "tensor")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    """Every task rendered (plugin ``kit_<task>``) and installed into one ``--target`` dir."""
    work = tmp_path_factory.mktemp("template")
    packages = {}
    for task in TASKS:
        pkg = work / f"modelyard-kit-{task}"
        subprocess.run(
            [sys.executable, str(ROOT / "plugin-template" / "render.py"), "--name",
             f"kit_{task}", "--task", task, "--out", str(pkg)],
            check=True, capture_output=True,
        )
        packages[task] = pkg
    site = work / "site"
    # One pip run for all five: each run pays pip's own start-up again.
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--target", str(site), *map(str, packages.values())],
        check=True, capture_output=True,
    )
    return packages, site


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MODELYARD_PLUGINS", None)
    return env


def test_rendered_plugins_are_discovered_through_their_entry_points(
    installed: tuple[dict[str, Path], Path],
) -> None:
    _, site = installed
    out = subprocess.run(
        [sys.executable, "-m", "modelyard", "plugins", "--json"],
        env=_env(site), check=True, capture_output=True, text=True,
    ).stdout
    records = {r["name"]: r for r in json.loads(out)}
    for task in TASKS:
        record = records[f"kit_{task}"]
        assert record["status"] == "loaded", record
        assert record["backends"] == [f"kit_{task}"]
        assert record["source"] == f"modelyard-kit-{task}"


@pytest.mark.parametrize("task", TASKS)
def test_a_rendered_plugin_passes_the_conformance_kit_unedited(
    installed: tuple[dict[str, Path], Path], task: str
) -> None:
    packages, site = installed
    pkg = packages[task]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "tests"],
        env=_env(site), capture_output=True, text=True, cwd=pkg, check=False, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, result.stdout
    # The kit's checks for one task: 3 once, 10 per task (2 of them stream-only).
    expected = "13 passed" if task in ("chat", "completion") else "11 passed, 2 skipped"
    assert summary.startswith(expected), result.stdout


def test_an_unknown_task_is_refused_naming_the_choices(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "plugin-template" / "render.py"), "--name", "x_y",
         "--task", "translation", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode != 0
    assert "invalid choice: 'translation'" in result.stderr
    assert not (tmp_path / "out").exists()
