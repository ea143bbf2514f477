"""``hf:`` sources through huggingface_hub against a local Hub lookalike (``HF_ENDPOINT``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import Fault, HfRepo, LocalServer, sha256

from modelyard.core.errors import ModelLoadError
from modelyard.core.sources import SourceResolver
from modelyard.plugins.store import ModelStore, pull
from modelyard.plugins.store.schemes import HfSource

hub = pytest.importorskip("huggingface_hub")
hub_constants = pytest.importorskip("huggingface_hub.constants")
hub_utils = pytest.importorskip("huggingface_hub.utils")

GGUF = b"GGUF" + bytes(range(256)) * 2048
CONFIG = b'{"hidden_size": 8}'
ONNX = b"onnx-graph" * 1000
REPO = "tiny-org/tiny-model"


@pytest.fixture
def server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LocalServer]:
    """The Hub lookalike, with huggingface_hub pointed at it and at a fresh cache."""
    with LocalServer.running() as running:
        running.hf[REPO] = HfRepo(
            files={"model.gguf": GGUF, "config.json": CONFIG, "onnx/model.onnx": ONNX},
            lfs=frozenset({"model.gguf", "onnx/model.onnx"}),
        )
        monkeypatch.setenv("HF_ENDPOINT", running.base)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        # The Hub client read these at import (the suite runs with HF_HUB_OFFLINE=1).
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        hub_utils.reset_sessions()
        try:
            yield running
        finally:
            hub_utils.reset_sessions()


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def _quiet(label: str, done: int, total: int | None) -> None:
    pass


def test_a_single_file_is_pulled_at_its_commit_and_verified(
    server: LocalServer, store: ModelStore
) -> None:
    result = pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    assert result.path.name == "model.gguf" and result.path.read_bytes() == GGUF
    assert result.manifest.revision == server.hf[REPO].commit
    assert result.manifest.digest == sha256(GGUF)
    assert result.manifest.source == f"hf:{REPO}/model.gguf"
    # the Hub client's own cache holds it too, under its blobs/snapshots layout
    assert any((Path(hub_constants.HF_HUB_CACHE)).rglob("model.gguf"))


def test_a_second_pull_of_the_same_commit_downloads_nothing(
    server: LocalServer, store: ModelStore
) -> None:
    first = pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    gets = len([r for r in server.requests if r.method == "GET"])
    second = pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    assert not second.changed and second.manifest == first.manifest
    assert len([r for r in server.requests if r.method == "GET"]) == gets


def test_a_whole_repository_and_a_folder_of_it(server: LocalServer, store: ModelStore) -> None:
    whole = pull(f"hf:{REPO}", store, progress=_quiet)
    assert whole.path.is_dir()
    assert sorted(f.path for f in whole.manifest.files) == [
        "config.json", "model.gguf", "onnx/model.onnx"
    ]
    assert (whole.path / "config.json").read_bytes() == CONFIG  # a non-LFS file (git blob id)
    folder = pull(f"hf:{REPO}/onnx", store, progress=_quiet)
    assert [f.path for f in folder.manifest.files] == ["model.onnx"]
    assert (folder.path / "model.onnx").read_bytes() == ONNX


def test_a_revision_pins_the_commit(server: LocalServer, store: ModelStore) -> None:
    commit = server.hf[REPO].commit
    result = pull(f"hf:{REPO}@{commit}/config.json", store, progress=_quiet)
    assert result.manifest.revision == commit
    assert any(f"/resolve/{commit}/config.json" in r.path for r in server.requests)


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("hf:nobody/nothing/model.gguf", "repository nobody/nothing not found"),
        (f"hf:{REPO}/missing.gguf", "has no file or folder 'missing.gguf'"),
        (f"hf:{REPO}@v9/model.gguf", "revision 'v9' not found"),
        ("hf:just-one-part", "expected hf:ORG/REPO"),
    ],
)
def test_a_missing_repo_file_or_revision_names_the_source(
    server: LocalServer, store: ModelStore, source: str, problem: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        pull(source, store, progress=_quiet)
    assert source in caught.value.detail and problem in caught.value.detail
    assert store.manifests() == []


def test_a_file_that_does_not_match_the_hubs_digest_is_refused(
    server: LocalServer, store: ModelStore
) -> None:
    server.hf[REPO].etags["model.gguf"] = "f" * 64
    with pytest.raises(ModelLoadError) as caught:
        pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    assert f"expected {'f' * 64}, actual {sha256(GGUF)}" in caught.value.detail
    assert store.manifests() == [] and not store.blob(sha256(GGUF)).exists()


def test_a_sha256_pin_on_an_hf_source_is_enforced(
    server: LocalServer, store: ModelStore
) -> None:
    with pytest.raises(ModelLoadError, match=f"expected {'0' * 64}, actual {sha256(GGUF)}"):
        pull(f"hf:{REPO}/model.gguf#sha256={'0' * 64}", store, progress=_quiet)
    assert store.manifests() == []
    assert pull(f"hf:{REPO}/model.gguf#sha256={sha256(GGUF)}", store, progress=_quiet).changed


def test_a_server_error_names_the_source_and_the_status(
    server: LocalServer, store: ModelStore
) -> None:
    server.faults[f"/api/models/{REPO}/revision/main"].append(Fault("status", 500))
    with pytest.raises(ModelLoadError) as caught:
        pull(f"hf:{REPO}", store, progress=_quiet)
    assert f"hf:{REPO}" in caught.value.detail and "HTTP 500" in caught.value.detail
    assert store.manifests() == []


def test_an_interrupted_download_is_resumed_by_the_next_pull(
    server: LocalServer, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunk = 1 << 16  # the Hub client keeps whole chunks of this size from a cut transfer
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", chunk)
    path = f"/{REPO}/resolve/{server.hf[REPO].commit}/model.gguf"
    server.faults[path].append(Fault("truncate", 200_000))
    with pytest.raises(ModelLoadError) as caught:
        pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    assert f"hf:{REPO}/model.gguf" in caught.value.detail and "resume" in caught.value.detail
    assert store.manifests() == []
    result = pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    assert result.path.read_bytes() == GGUF
    assert server.gets(path)[-1].headers.get("Range") == f"bytes={200_000 // chunk * chunk}-"


def test_the_scheme_pulls_on_first_use_then_works_offline(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolve = SourceResolver({"hf": HfSource})
    path = resolve(f"hf:{REPO}/model.gguf", tmp_path, lambda phase, percent: None)
    assert path.read_bytes() == GGUF
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(server.requests)
    assert resolve(f"hf:{REPO}/model.gguf", tmp_path, lambda phase, percent: None) == path
    pinned = f"hf:{REPO}/model.gguf#sha256={sha256(GGUF)}"
    assert resolve(pinned, tmp_path, lambda phase, percent: None) == path
    with pytest.raises(ModelLoadError, match="mismatch: expected 0000"):
        resolve(f"hf:{REPO}/model.gguf#sha256={'0' * 64}", tmp_path, lambda p, q: None)
    assert len(server.requests) == requests


def test_offline_the_hub_cache_is_used_and_nothing_else(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub.hf_hub_download(REPO, "model.gguf", endpoint=server.base)  # in the Hub cache only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(server.requests)
    store = ModelStore(tmp_path / "store")
    result = pull(f"hf:{REPO}/model.gguf", store, progress=_quiet)
    assert result.path.read_bytes() == GGUF
    assert result.manifest.revision == server.hf[REPO].commit
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache and offline"):
        pull(f"hf:{REPO}/config.json", store, progress=_quiet)
    assert len(server.requests) == requests
