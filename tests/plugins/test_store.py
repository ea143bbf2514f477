"""The content-addressed store: layout, idempotence, refcounted rm, verify, and pins on load."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from store_helpers import sha256

from modelyard import hookimpl
from modelyard.cli import cli
from modelyard.core.errors import ConfigError, ModelLoadError
from modelyard.core.integrity import listing_digest
from modelyard.core.plugins import PluginHost
from modelyard.core.registry import VersionState
from modelyard.core.service import InferenceService
from modelyard.core.settings import Settings, decode_settings, resolve_models
from modelyard.core.sources import SourceResolver
from modelyard.plugins.store import ModelStore, pull
from modelyard.plugins.store import store as store_module
from modelyard.plugins.store.schemes import StoreSource

DATA = b"model weights " * 10_000


def _quiet(label: str, done: int, total: int | None) -> None:
    pass


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "cache" / "store")


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path


def test_a_pulled_file_is_a_blob_named_by_its_digest_with_a_manifest(
    store: ModelStore, weights: Path
) -> None:
    result = pull(str(weights), store, progress=_quiet)
    blob = store.root / "blobs" / "sha256" / sha256(DATA)
    assert blob.read_bytes() == DATA
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0  # read-only (root may write)
    assert blob.stat().st_mode & 0o222 == 0
    manifest = json.loads((store.root / "manifests" / "tiny.json").read_text())
    assert manifest["source"] == str(weights.resolve())
    assert manifest["files"] == [{"path": "tiny.gguf", "size": len(DATA), "sha256": sha256(DATA)}]
    assert manifest["digest"] == sha256(DATA) and manifest["pulled_at"]
    assert result.path == store.root / "models" / "tiny" / "tiny.gguf"
    assert result.path.read_bytes() == DATA
    assert not list((store.root / "tmp").iterdir())


def test_a_second_pull_of_the_same_content_is_a_no_op(store: ModelStore, weights: Path) -> None:
    first = pull(str(weights), store, progress=_quiet)
    manifest_file = store.root / "manifests" / "tiny.json"
    before = manifest_file.stat().st_mtime_ns
    second = pull(str(weights), store, progress=_quiet)
    assert not second.changed and second.manifest == first.manifest
    assert manifest_file.stat().st_mtime_ns == before


def test_a_folder_is_pinned_by_its_listing_digest(store: ModelStore, tmp_path: Path) -> None:
    folder = tmp_path / "onnx-model"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "sub" / "tokenizer.json").write_bytes(b"{}")
    result = pull(str(folder), store, progress=_quiet)
    expected = listing_digest(
        [("model.onnx", sha256(b"graph")), ("sub/tokenizer.json", sha256(b"{}"))]
    )
    assert result.manifest.digest == expected and result.path.is_dir()
    assert (result.path / "sub" / "tokenizer.json").read_bytes() == b"{}"
    resolve = SourceResolver({})
    assert resolve(f"{folder}#sha256={expected}", tmp_path, lambda p, q: None) == folder.resolve()


def test_rm_keeps_the_blobs_another_model_still_uses(
    store: ModelStore, weights: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"other")
    pull(str(weights), store, progress=_quiet, name="a")
    pull(str(weights), store, progress=_quiet, name="b")
    pull(str(other), store, progress=_quiet, name="c")
    assert store.remove("a") == (0, 0)  # "b" shares the blob
    assert store.blob(sha256(DATA)).exists()
    assert store.remove("b") == (1, len(DATA))
    assert not store.blob(sha256(DATA)).exists() and not (store.root / "models" / "b").exists()
    assert store.blob(sha256(b"other")).exists()
    assert [m.name for m in store.manifests()] == ["c"]


def test_a_name_that_holds_another_source_is_not_overwritten(
    store: ModelStore, weights: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"other")
    pull(str(weights), store, progress=_quiet, name="llm")
    with pytest.raises(ModelLoadError, match="the name 'llm' already holds"):
        pull(str(other), store, progress=_quiet, name="llm")
    assert pull(str(other), store, progress=_quiet).manifest.name == "other"


def test_a_full_disk_while_storing_leaves_nothing_half_written(
    store: ModelStore, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: Any, **kwargs: Any) -> str:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_copy_hashing", full)
    with pytest.raises(ModelLoadError) as caught:
        pull(str(weights), store, progress=_quiet)
    assert str(weights.resolve()) in caught.value.detail and "full" in caught.value.detail
    assert store.manifests() == []
    assert not (store.root / "blobs").exists() or not any((store.root / "blobs").rglob("*.*"))
    assert not list((store.root / "tmp").iterdir())


def test_unknown_schemes_and_missing_paths_name_the_source(store: ModelStore) -> None:
    with pytest.raises(ModelLoadError, match=r"'s3://bucket/m.gguf': unknown scheme 's3:'"):
        pull("s3://bucket/m.gguf", store, progress=_quiet)
    with pytest.raises(ModelLoadError, match="does not exist"):
        pull("/no/such/model.gguf", store, progress=_quiet)


def test_a_damaged_blob_is_caught_on_load_and_by_verify(store: ModelStore, weights: Path) -> None:
    result = pull(str(weights), store, progress=_quiet, name="tiny")
    blob = store.blob(sha256(DATA))
    blob.chmod(0o644)
    blob.write_bytes(DATA[:-1] + b"!")  # same size, other content
    assert store.verify(result.manifest, _quiet) == [
        f"tiny.gguf: sha256 mismatch: expected {sha256(DATA)}, actual {sha256(DATA[:-1] + b'!')}"
    ]
    resolve = SourceResolver({"store": StoreSource})
    cache_dir = store.root.parent
    with pytest.raises(ModelLoadError, match=f"expected {sha256(DATA)}"):
        resolve(f"store:tiny#sha256={sha256(DATA)}", cache_dir, lambda p, q: None)
    blob.write_bytes(b"short")
    with pytest.raises(ModelLoadError, match="missing or not"):
        resolve("store:tiny", cache_dir, lambda p, q: None)


def test_the_models_commands_list_verify_and_remove(
    store: ModelStore, weights: Path
) -> None:
    pull(str(weights), store, progress=_quiet, name="tiny")
    cache_dir = str(store.root.parent)
    runner = CliRunner()
    listed = runner.invoke(cli, ["models", "ls", "--json", "--cache-dir", cache_dir])
    assert listed.exit_code == 0, listed.output
    assert [m["name"] for m in json.loads(listed.stdout)] == ["tiny"]
    table = runner.invoke(cli, ["models", "ls", "--cache-dir", cache_dir])
    assert table.exit_code == 0 and "tiny" in table.output
    verified = runner.invoke(cli, ["models", "verify", "--cache-dir", cache_dir])
    assert verified.exit_code == 0 and "tiny: ok" in verified.output
    blob = store.blob(sha256(DATA))
    blob.chmod(0o644)
    blob.write_bytes(b"x" * len(DATA))
    damaged = runner.invoke(cli, ["models", "verify", "tiny", "--cache-dir", cache_dir])
    assert damaged.exit_code == 1 and "sha256 mismatch" in damaged.output
    removed = runner.invoke(cli, ["models", "rm", "tiny", "--cache-dir", cache_dir])
    assert removed.exit_code == 0 and "removed tiny" in removed.output
    missing = runner.invoke(cli, ["models", "rm", "tiny", "--cache-dir", cache_dir])
    assert missing.exit_code == 1 and "no model named 'tiny'" in missing.output


def test_the_store_scheme_resolves_a_pulled_name_and_refuses_an_unknown_one(
    store: ModelStore, weights: Path
) -> None:
    pull(str(weights), store, progress=_quiet, name="tiny")
    resolve = SourceResolver({"store": StoreSource})
    path = resolve("store:tiny", store.root.parent, lambda p, q: None)
    assert path.read_bytes() == DATA
    with pytest.raises(ModelLoadError, match="no model named 'ghost'"):
        resolve("store:ghost", store.root.parent, lambda p, q: None)


def test_a_pinned_local_path_with_the_wrong_digest_names_both(weights: Path) -> None:
    resolve = SourceResolver({})
    assert resolve(f"{weights}#sha256={sha256(DATA)}", weights.parent, lambda p, q: None)
    wrong = "ab" * 32
    with pytest.raises(ModelLoadError) as caught:
        resolve(f"{weights}#sha256={wrong}", weights.parent, lambda p, q: None)
    assert f"expected {wrong}, actual {sha256(DATA)}" in caught.value.detail
    assert str(weights) in caught.value.detail


def test_config_sha256_becomes_the_sources_pin(plugin_host: PluginHost, weights: Path) -> None:
    settings = decode_settings({"models": [
        {"name": "m", "backend": "echo", "source": str(weights), "sha256": sha256(DATA).upper()}
    ]}, env={})
    spec = resolve_models(settings, plugin_host.backends)[0]
    assert spec.source == f"{weights}#sha256={sha256(DATA)}"
    clash = decode_settings({"models": [{
        "name": "m", "backend": "echo", "source": f"{weights}#sha256={'1' * 64}",
        "sha256": sha256(DATA),
    }]}, env={})
    with pytest.raises(ConfigError, match=r"\$\.models\[0\]\.sha256: sha256 "):
        resolve_models(clash, plugin_host.backends)
    with pytest.raises(ConfigError, match=r"\$\.models\[0\]\.sha256"):
        decode_settings({"models": [
            {"name": "m", "backend": "echo", "source": "x", "sha256": "nothex"}
        ]}, env={})


async def test_a_pin_mismatch_fails_the_new_version_and_the_active_one_keeps_serving(
    plugin_host: PluginHost, weights: Path
) -> None:
    failed = asyncio.Event()

    class Watch:
        @hookimpl
        def model_version_state_changed(self, version: Any, old: Any, new: Any) -> None:
            if version.version == "2" and new == VersionState.FAILED:
                failed.set()

    plugin_host.register(Watch(), name="watch")
    settings: Settings = decode_settings({"models": [{
        "name": "m", "backend": "echo", "task": "chat", "source": str(weights),
        "sha256": sha256(DATA),
    }]}, env={})
    service = InferenceService(settings, plugin_host)
    await service.start()
    try:
        await service.wait_until_loaded()
        assert service.version_view("m", "1").state == VersionState.ACTIVE
        wrong = "cd" * 32
        service.add_version("m", "2", f"{weights}#sha256={wrong}")
        await asyncio.wait_for(failed.wait(), timeout=30)
        view = service.version_view("m", "2")
        assert f"expected {wrong}, actual {sha256(DATA)}" in (view.error or "")
        assert service.version_view("m", "1").state == VersionState.ACTIVE
    finally:
        await service.stop()
        plugin_host.unregister("watch")
