"""The import-linter contracts in pyproject.toml hold: layers point down (docs/architecture.md)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    found = Path(sys.executable).parent / "lint-imports"
    if found.exists():
        return str(found)
    path = shutil.which("lint-imports")
    if path is None:
        pytest.fail("lint-imports is missing: it comes with modelyard[test] (import-linter)")
    return path


def test_the_import_contracts_hold() -> None:
    result = subprocess.run(
        [_lint_imports(), "--no-cache"], cwd=ROOT, capture_output=True, text=True,
        check=False, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_a_contract(tmp_path: Path) -> None:
    """The contracts can fail: the core importing the cache package is caught."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "modelyard"\n\n'
        '[[tool.importlinter.contracts]]\nname = "probe"\ntype = "forbidden"\n'
        'source_modules = ["modelyard.cache"]\nforbidden_modules = ["modelyard.core"]\n'
    )
    result = subprocess.run(
        [_lint_imports(), "--no-cache", "--config", str(config)], cwd=ROOT,
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
