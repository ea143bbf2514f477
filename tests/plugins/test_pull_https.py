"""``modelyard pull`` of http(s) URLs: pinned, verified, resumable; faults injected locally."""

from __future__ import annotations

import base64
import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from store_helpers import Fault, LocalServer, sha256

from modelyard.cli import cli
from modelyard.core.errors import ModelLoadError
from modelyard.core.sources import SourceResolver
from modelyard.plugins.store import ModelStore, pull
from modelyard.plugins.store import transfer as transfer_module
from modelyard.plugins.store.schemes import HttpSource, HttpsSource

WEIGHTS = bytes(range(256)) * 4096  # 1 MiB


@pytest.fixture
def server() -> Iterator[LocalServer]:
    with LocalServer.running() as running:
        yield running


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModelStore:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return ModelStore(tmp_path / "store")


class Bytes:
    """A progress sink that records what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None]] = []

    def __call__(self, label: str, done: int, total: int | None) -> None:
        self.calls.append((label, done, total))


def _quiet(label: str, done: int, total: int | None) -> None:
    pass


def _partials(store: ModelStore) -> list[Path]:
    return sorted((store.root / "tmp").glob("*.part")) if (store.root / "tmp").exists() else []


def _blobs(store: ModelStore) -> list[Path]:
    folder = store.root / "blobs" / "sha256"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_pinned_url_is_downloaded_verified_and_stored_with_progress(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    progress = Bytes()
    result = pull(url, store, progress=progress)
    assert result.changed
    assert result.path.read_bytes() == WEIGHTS
    assert result.manifest.digest == sha256(WEIGHTS)
    assert result.manifest.name == "model"
    assert progress.calls[-1] == ("model.gguf", len(WEIGHTS), len(WEIGHTS))
    assert [p.name for p in _blobs(store)] == [sha256(WEIGHTS)]
    assert _partials(store) == []


def test_a_second_pull_of_a_pinned_url_sends_no_request(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    first = pull(url, store, progress=_quiet)
    requests = len(server.requests)
    second = pull(url, store, progress=_quiet)
    assert not second.changed
    assert second.manifest == first.manifest
    assert len(server.requests) == requests


@pytest.mark.parametrize(
    "headers",
    [
        {"Repr-Digest": "sha-256=:{b64}:"},
        {"Digest": "SHA-256={b64}"},
        {"X-Checksum-Sha256": "{hex}"},
    ],
    ids=["repr-digest", "digest", "x-checksum-sha256"],
)
def test_an_unpinned_url_is_verified_against_the_servers_digest(
    server: LocalServer, store: ModelStore, headers: dict[str, str]
) -> None:
    b64 = base64.b64encode(hashlib.sha256(WEIGHTS).digest()).decode()
    filled = {k: v.format(b64=b64, hex=sha256(WEIGHTS)) for k, v in headers.items()}
    url = server.add("/m/model.onnx", WEIGHTS, **filled)
    assert pull(url, store, progress=_quiet).path.read_bytes() == WEIGHTS


def test_a_server_digest_that_disagrees_with_the_bytes_is_refused(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.onnx", WEIGHTS, X_Checksum_Sha256="ab" * 32)
    with pytest.raises(ModelLoadError, match="sha256 mismatch: expected abab"):
        pull(url, store, progress=_quiet)
    assert _blobs(store) == [] and _partials(store) == []


def test_an_unpinned_url_without_a_server_digest_is_refused_before_the_body(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.onnx", WEIGHTS)
    with pytest.raises(ModelLoadError) as caught:
        pull(url, store, progress=_quiet)
    assert url in caught.value.detail and "#sha256=" in caught.value.detail
    assert _blobs(store) == [] and _partials(store) == []
    assert store.manifests() == []


def test_a_wrong_pin_names_expected_and_actual_and_leaves_nothing(
    server: LocalServer, store: ModelStore
) -> None:
    wrong = "0" * 64
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={wrong}"
    with pytest.raises(ModelLoadError) as caught:
        pull(url, store, progress=_quiet)
    detail = caught.value.detail
    assert "/m/model.gguf" in detail and wrong in detail and sha256(WEIGHTS) in detail
    assert _blobs(store) == [] and _partials(store) == [] and store.manifests() == []


def test_a_blake3_pin_is_checked(server: LocalServer, store: ModelStore) -> None:
    blake3 = pytest.importorskip("blake3")
    digest = blake3.blake3(WEIGHTS).hexdigest()
    url = server.add("/m/model.gguf", WEIGHTS) + f"#blake3={digest}"
    result = pull(url, store, progress=_quiet)
    assert result.manifest.files[0].blake3 == digest
    with pytest.raises(ModelLoadError, match="blake3 mismatch"):
        pull(server.add("/m/other.gguf", WEIGHTS[:10]) + f"#blake3={digest}", store,
             progress=_quiet)


def test_a_truncated_transfer_keeps_its_partial_and_the_next_pull_resumes_it(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    server.faults["/m/model.gguf"].append(Fault("truncate", 300_000))
    with pytest.raises(ModelLoadError) as caught:
        pull(url, store, progress=_quiet)
    assert "/m/model.gguf" in caught.value.detail and "resume" in caught.value.detail
    assert [p.stat().st_size for p in _partials(store)] == [300_000]
    assert _blobs(store) == [] and store.manifests() == []

    result = pull(url, store, progress=_quiet)
    assert result.path.read_bytes() == WEIGHTS
    assert server.gets("/m/model.gguf")[-1].headers["Range"] == "bytes=300000-"
    assert _partials(store) == []


def test_a_server_error_mid_file_is_reported_and_a_later_pull_resumes(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    server.faults["/m/model.gguf"].extend([Fault("truncate", 500_000), Fault("status", 500)])
    with pytest.raises(ModelLoadError):
        pull(url, store, progress=_quiet)
    with pytest.raises(ModelLoadError) as caught:
        pull(url, store, progress=_quiet)
    assert "HTTP 500" in caught.value.detail and "/m/model.gguf" in caught.value.detail
    assert [p.stat().st_size for p in _partials(store)] == [500_000]

    assert pull(url, store, progress=_quiet).path.read_bytes() == WEIGHTS
    assert server.gets("/m/model.gguf")[-1].headers["Range"] == "bytes=500000-"


def test_a_server_that_ignores_the_range_is_downloaded_afresh(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    server.faults["/m/model.gguf"].extend([Fault("truncate", 1000), Fault("ignore-range")])
    with pytest.raises(ModelLoadError):
        pull(url, store, progress=_quiet)
    assert pull(url, store, progress=_quiet).path.read_bytes() == WEIGHTS


def test_a_full_disk_is_reported_and_leaves_nothing_half_written(
    server: LocalServer, store: ModelStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    opened = transfer_module._open_partial

    class FullDisk:
        def __init__(self, real: Any) -> None:
            self.real, self.written = real, 0

        def write(self, chunk: bytes) -> int:
            if self.written + len(chunk) > 200_000:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.written += len(chunk)
            return int(self.real.write(chunk))

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

        def __enter__(self) -> FullDisk:
            return self

        def __exit__(self, *exc: object) -> None:
            self.real.close()

    monkeypatch.setattr(
        transfer_module, "_open_partial", lambda path, append: FullDisk(opened(path, append=append))
    )
    with pytest.raises(ModelLoadError) as caught:
        pull(url, store, progress=_quiet)
    assert "full" in caught.value.detail and "/m/model.gguf" in caught.value.detail
    assert _blobs(store) == [] and _partials(store) == [] and store.manifests() == []


def test_a_missing_file_names_the_source_and_the_status(
    server: LocalServer, store: ModelStore
) -> None:
    url = server.url("/nothing.gguf") + "#sha256=" + "1" * 64
    with pytest.raises(ModelLoadError, match=r"/nothing.gguf.*not found \(HTTP 404"):
        pull(url, store, progress=_quiet)


def test_an_unreachable_server_is_a_network_error_naming_the_source(store: ModelStore) -> None:
    with LocalServer.running() as gone:
        url = gone.url("/m.gguf") + "#sha256=" + "1" * 64
    with pytest.raises(ModelLoadError, match=r"/m.gguf.*cannot connect"):
        pull(url, store, progress=_quiet)


def test_plain_http_to_a_remote_host_is_refused_without_a_request(store: ModelStore) -> None:
    with pytest.raises(ModelLoadError, match="plain http is allowed only for loopback"):
        pull("http://models.example/m.gguf#sha256=" + "1" * 64, store, progress=_quiet)


def test_a_configured_url_is_pulled_on_first_use_then_served_offline(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    resolve = SourceResolver({"http": HttpSource, "https": HttpsSource})
    steps: list[tuple[str, float]] = []
    path = resolve(url, tmp_path, lambda phase, percent: steps.append((phase, percent)))
    assert path.read_bytes() == WEIGHTS
    assert steps and all(0 <= p <= 100 for _, p in steps)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(server.requests)
    assert resolve(url, tmp_path, lambda phase, percent: None) == path
    assert len(server.requests) == requests


def test_offline_a_url_the_store_lacks_fails_without_a_request(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    resolve = SourceResolver({"http": HttpSource})
    with pytest.raises(ModelLoadError, match="offline"):
        resolve(url, tmp_path, lambda phase, percent: None)
    assert server.requests == []


def test_the_pull_command_exits_0_on_success_and_1_naming_the_source(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    url = server.add("/m/model.gguf", WEIGHTS) + f"#sha256={sha256(WEIGHTS)}"
    runner = CliRunner()
    ok = runner.invoke(cli, ["pull", url, "--name", "tiny", "--cache-dir", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "pulled tiny" in ok.output
    again = runner.invoke(cli, ["pull", url, "--name", "tiny", "--cache-dir", str(tmp_path)])
    assert again.exit_code == 0 and "up to date" in again.output
    bad = server.url("/missing.gguf") + "#sha256=" + "1" * 64
    failed = runner.invoke(cli, ["pull", bad, "--cache-dir", str(tmp_path)])
    assert failed.exit_code == 1
    assert "/missing.gguf" in failed.output and "HTTP 404" in failed.output


def test_a_missing_url_fails_even_when_the_store_holds_its_pinned_content(
    server: LocalServer, store: ModelStore
) -> None:
    pin = f"#sha256={sha256(WEIGHTS)}"
    pull(server.add("/m/model.gguf", WEIGHTS) + pin, store, progress=_quiet)
    with pytest.raises(ModelLoadError, match=r"/typo.gguf.*HTTP 404"):
        pull(server.url("/typo.gguf") + pin, store, progress=_quiet)
    server.add("/mirror/model.gguf", WEIGHTS)
    mirror = pull(server.url("/mirror/model.gguf") + pin, store, progress=_quiet)
    assert mirror.path.read_bytes() == WEIGHTS
    assert server.gets("/mirror/model.gguf")  # asked once: the URL must answer
