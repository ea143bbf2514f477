"""``modelyard lock`` and ``serve --locked``: resolved revisions and digests, then enforced."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from store_helpers import HfRepo, LocalServer, sha256

from modelyard.cli import cli
from modelyard.core.errors import ConfigError, ModelLoadError
from modelyard.core.settings import load_settings
from modelyard.plugins.sources import PypiSource
from modelyard.plugins.store.lock import (
    LOCK_NAME,
    lock_models,
    read_lock,
    serve_resolver,
    write_lock,
)
from modelyard.plugins.store.schemes import HfSource, HttpSource, StoreSource

WEIGHTS = b"locked weights " * 1000
SCHEMES = {"http": HttpSource, "hf": HfSource, "pypi": PypiSource, "store": StoreSource}
REPO = "tiny-org/tiny-model"


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    hub_constants = pytest.importorskip("huggingface_hub.constants")
    hub_utils = pytest.importorskip("huggingface_hub.utils")
    with LocalServer.running() as running:
        running.hf[REPO] = HfRepo(files={"model.gguf": WEIGHTS}, lfs=frozenset({"model.gguf"}))
        monkeypatch.setenv("HF_ENDPOINT", running.base)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        hub_utils.reset_sessions()
        yield running
        hub_utils.reset_sessions()


@pytest.fixture
def config(tmp_path: Path, server: LocalServer) -> Path:
    local = tmp_path / "local.gguf"
    local.write_bytes(b"local weights")
    url = server.add("/w/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    path = tmp_path / "modelyard.toml"
    path.write_text(
        f'cache_dir = "{tmp_path / "cache"}"\n'
        f'[[models]]\nname = "local"\nbackend = "echo"\nsource = "{local}"\n'
        f'[[models]]\nname = "url"\nbackend = "echo"\nsource = "{url}"\n'
        f'[[models]]\nname = "hub"\nbackend = "echo"\nsource = "hf:{REPO}/model.gguf"\n'
    )
    return path


def _none(phase: str, percent: float) -> None:
    pass


def test_lock_records_each_models_revision_and_digests(config: Path, server: LocalServer) -> None:
    lock = lock_models(load_settings(config), SCHEMES, _none)
    by_name = {m.name: m for m in lock.models}
    assert by_name["local"].digest == sha256(b"local weights")
    assert by_name["local"].files[0].size == len(b"local weights")
    url = by_name["url"]
    assert url.source == server.url("/w/model.gguf")
    assert url.resolved == f"{url.source}#sha256={sha256(WEIGHTS)}"
    hub = by_name["hub"]
    commit = server.hf[REPO].commit
    assert hub.revision == commit and hub.resolved == f"hf:{REPO}@{commit}/model.gguf"
    assert hub.digest == sha256(WEIGHTS)
    write_lock(lock, config.parent / LOCK_NAME)
    assert read_lock(config.parent / LOCK_NAME) == lock


def test_the_lock_command_writes_the_file_beside_the_config(config: Path) -> None:
    result = CliRunner().invoke(cli, ["lock", str(config)])
    assert result.exit_code == 0, result.output
    written = json.loads((config.parent / LOCK_NAME).read_text())
    assert [m["name"] for m in written["models"]] == ["local", "url", "hub"]


def test_locked_serving_loads_the_locked_content_and_refuses_anything_else(
    config: Path, tmp_path: Path
) -> None:
    settings = load_settings(config)
    write_lock(lock_models(settings, SCHEMES, _none), config.parent / LOCK_NAME)
    resolve = serve_resolver(str(config), settings, SCHEMES, locked=True, offline=False)
    assert resolve is not None
    cache = tmp_path / "cache"
    local = settings.models[0].source
    assert resolve(local, cache, _none).read_bytes() == b"local weights"
    assert resolve(settings.models[2].source, cache, _none).read_bytes() == WEIGHTS
    with pytest.raises(ModelLoadError, match="is not in modelyard.lock"):
        resolve(str(tmp_path / "other.gguf"), cache, _none)
    Path(local).write_bytes(b"tampered")
    with pytest.raises(ModelLoadError) as caught:
        resolve(local, cache, _none)
    assert f"expected {sha256(b'local weights')}, actual {sha256(b'tampered')}" in (
        caught.value.detail
    )


def test_a_locked_hub_file_is_fetched_at_the_locked_commit_offline_or_not(
    config: Path, tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(config)
    write_lock(lock_models(settings, SCHEMES, _none), config.parent / LOCK_NAME)
    resolve = serve_resolver(str(config), settings, SCHEMES, locked=True, offline=False)
    assert resolve is not None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(server.requests)
    assert resolve(settings.models[2].source, tmp_path / "cache", _none).read_bytes() == WEIGHTS
    assert resolve(settings.models[1].source, tmp_path / "cache", _none).read_bytes() == WEIGHTS
    assert len(server.requests) == requests
    # the Hub moved on: a fresh store pulls the locked commit, not main's new content
    monkeypatch.delenv("HF_HUB_OFFLINE")
    locked = server.hf[REPO].commit
    server.hf[REPO] = HfRepo(files={"model.gguf": b"newer"}, commit="f" * 40,
                             lfs=frozenset({"model.gguf"}))
    with pytest.raises(ModelLoadError, match=f"revision '{locked}' not found"):
        resolve(settings.models[2].source, tmp_path / "fresh-cache", _none)
    assert not any("/resolve/main/" in r.path for r in server.requests[requests:])


def test_serve_locked_refuses_a_config_the_lock_does_not_cover(config: Path) -> None:
    settings = load_settings(config)
    with pytest.raises(ConfigError, match="no lockfile"):
        serve_resolver(str(config), settings, SCHEMES, locked=True, offline=False)
    lock = lock_models(settings, SCHEMES, _none)
    lock.models.pop()
    write_lock(lock, config.parent / LOCK_NAME)
    with pytest.raises(ConfigError, match=r"does not list hub:1 \(hf:"):
        serve_resolver(str(config), settings, SCHEMES, locked=True, offline=False)
    with pytest.raises(ConfigError, match="--locked needs --config"):
        serve_resolver(None, settings, SCHEMES, locked=True, offline=False)


def test_serve_offline_sets_the_hub_offline_switch(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert serve_resolver(str(config), load_settings(config), SCHEMES, locked=False,
                          offline=True) is None
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_serve_locked_without_a_lock_exits_1(config: Path) -> None:
    result = CliRunner().invoke(cli, ["serve", "--config", str(config), "--locked"])
    assert result.exit_code == 1
    assert "no lockfile" in result.output
