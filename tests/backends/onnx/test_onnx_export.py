"""``export_model``: optimum export, torch validation, int8 quantisation, tokenizer files."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from modelyard.backends.onnx.backend import OnnxBackend
from modelyard.backends.onnx.options import OnnxOptions
from modelyard.core.errors import BadRequestError, ModelLoadError
from modelyard.core.types import Task

pytest.importorskip("optimum.exporters.onnx")


def test_exported_directories_are_servable_and_their_task_is_detected(
    tiny_encoder: Path, tiny_classifier: Path, tiny_gpt2: Path
) -> None:
    for path, task in (
        (tiny_encoder, Task.EMBEDDINGS),
        (tiny_classifier, Task.CLASSIFICATION),
        (tiny_gpt2, Task.CHAT),
    ):
        assert (path / "tokenizer.json").is_file() and (path / "config.json").is_file()
        assert OnnxBackend.detect_task(path, OnnxOptions()) == task


def test_int8_export_reports_its_difference_and_is_smaller(
    tmp_path: Path, tiny_classifier: Path, tiny_classifier_source: Path
) -> None:
    from modelyard.backends.onnx.export import export_model

    src = tiny_classifier_source
    phases: list[tuple[str, float]] = []
    report = export_model(
        src,
        tmp_path / "int8",
        task="classification",
        quantize="int8",
        progress=lambda phase, pct: phases.append((phase, pct)),
    )
    assert report.quantized == "int8" and report.compared_outputs == ["logits"]
    assert 0 < report.max_abs_diff < 0.5 and not math.isnan(report.max_abs_diff)
    assert (tmp_path / "int8" / "model.onnx").stat().st_size < (
        tiny_classifier / "model.onnx"
    ).stat().st_size
    assert [pct for _, pct in phases] == sorted(pct for _, pct in phases)
    assert phases[-1][1] == 100.0


def test_fp32_export_is_close_to_torch(tmp_path: Path, tiny_classifier_source: Path) -> None:
    from modelyard.backends.onnx.export import export_model

    src = tiny_classifier_source
    report = export_model(src, tmp_path / "out", task="classification")
    assert report.max_abs_diff < 1e-4


def test_bad_arguments_are_clear_errors(tmp_path: Path) -> None:
    from modelyard.backends.onnx.export import export_model

    with pytest.raises(BadRequestError, match="unknown task 'vision'"):
        export_model(tmp_path, tmp_path / "out", task="vision")
    with pytest.raises(ModelLoadError, match="no config.json"):
        export_model(tmp_path, tmp_path / "out", task="embeddings")


def test_the_cli_export_command(tmp_path: Path, tiny_classifier_source: Path) -> None:
    from click.testing import CliRunner

    from modelyard.cli import cli

    src = tiny_classifier_source
    result = CliRunner().invoke(
        cli,
        ["models", "export", str(src), "--task", "classification", "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert "exported to" in text and "max abs diff vs. source" in text
    assert OnnxBackend.detect_task(tmp_path / "out", OnnxOptions()) == Task.CLASSIFICATION
