"""``modelyard keys create|list|revoke`` against a key database file."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from modelyard.plugins.apikeys import ApiKeyOptions, KeyStore
from modelyard.plugins.keys_cli import keys_cmd


def _run(*args: str) -> click.testing.Result:
    return CliRunner().invoke(keys_cmd, list(args), catch_exceptions=False)


def test_create_list_revoke(tmp_path: Path) -> None:
    db = str(tmp_path / "keys.sqlite3")
    created = _run("--database", db, "create", "--name", "ci", "--role", "user", "--model", "echo",
                   "--expires-in", "30d", "--rate", "2", "--burst", "5", "--json")
    assert created.exit_code == 0, created.output
    info = json.loads(created.stdout)
    assert (
        info["key"].startswith("my_") and info["roles"] == ["user"] and info["models"] == ["echo"]
    )
    assert info["rate_limit"] == {"rate": 2.0, "burst": 5}
    store = KeyStore.open(ApiKeyOptions(database=db))
    assert store.verify(info["key"]).name == "ci"

    listed = json.loads(_run("--database", db, "list", "--json").stdout)
    assert [(k["id"], k["status"]) for k in listed] == [(info["id"], "active")]
    assert info["key"] not in _run("--database", db, "list", "--json").stdout
    assert info["id"] in _run("--database", db, "list").stdout

    revoked = _run("--database", db, "revoke", f"key:{info['id']}")
    assert revoked.exit_code == 0 and "revoked" in revoked.stdout
    assert json.loads(_run("--database", db, "list", "--json").stdout)[0]["status"] == "revoked"
    assert (tmp_path / "keys.sqlite3").read_bytes().find(info["key"].encode()) == -1


def test_plain_create_prints_only_the_key_on_stdout(tmp_path: Path) -> None:
    result = _run("--database", str(tmp_path / "k.db"), "create", "--name", "x", "--role", "admin")
    assert result.exit_code == 0
    assert result.stdout.strip().startswith("my_") and "\n" not in result.stdout.strip()
    assert "not kept" in result.stderr


def test_bad_input_is_refused(tmp_path: Path) -> None:
    db = str(tmp_path / "k.db")
    runner = CliRunner()
    assert runner.invoke(keys_cmd, ["--database", db, "create", "--name", "x",
                                    "--role", "root"]).exit_code == 2
    assert runner.invoke(keys_cmd, ["--database", db, "create", "--name", "x", "--role", "user",
                                    "--expires-in", "soon"]).exit_code == 2
    assert runner.invoke(keys_cmd, ["--database", db, "create", "--name", "x", "--role", "user",
                                    "--rate", "1"]).exit_code == 2
    missing = runner.invoke(keys_cmd, ["--database", db, "revoke", "0123456789abcdef"])
    assert missing.exit_code == 1 and "no key" in missing.stderr


def test_a_key_name_with_brackets_is_listed_as_it_is(tmp_path: Path) -> None:
    """Rich would read "[ops]" as markup and print nothing of it."""
    db = str(tmp_path / "keys.sqlite3")
    assert _run("--database", db, "create", "--name", "[ops]", "--role", "user").exit_code == 0
    assert "[ops]" in _run("--database", db, "list").stdout
