"""``modelyard models export``: a Hugging Face model directory to a servable ONNX directory.

optimum-onnx does the export; the result is then checked against the source model in torch
on a few real sentences, and optionally quantised to int8 with onnxruntime. torch, optimum
and transformers are imported inside the functions: this module is never on the serving path.
"""

from __future__ import annotations

import logging
import math
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelyard.core.errors import BadRequestError, ModelLoadError

__all__ = ["OPTIMUM_TASKS", "ExportReport", "export_model"]

log = logging.getLogger("modelyard.backends.onnx")

#: modelyard's task names -> optimum's (``auto`` lets optimum infer one for ``tensor``).
OPTIMUM_TASKS = {
    "embeddings": "feature-extraction",
    "classification": "text-classification",
    "text-generation": "text-generation-with-past",
    "tensor": "auto",
}
#: Tokenizer and generation files the backend reads, copied when optimum did not write them.
_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentence_bert_config.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "config.json",
)
_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "modelyard serves ONNX models.",
    "A third, somewhat longer sentence checks that padding and the attention mask agree.",
)
_TEXT_INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids"})

Progress = Callable[[str, float], None]


@dataclass
class ExportReport:
    """What an export produced and how closely it matches the source model."""

    output: Path
    task: str
    optimum_task: str
    #: Largest absolute difference between onnxruntime and torch outputs (NaN: not checked).
    max_abs_diff: float
    quantized: str | None = None
    compared_outputs: list[str] = field(default_factory=list)


def _no_progress(phase: str, percent: float) -> None:
    pass


def export_model(
    src: Path,
    out: Path,
    *,
    task: str,
    quantize: str | None = None,
    progress: Progress | None = None,
) -> ExportReport:
    """Export ``src`` for ``task`` into ``out``, validate it with torch, optionally quantise."""
    report = progress or _no_progress
    optimum_task = OPTIMUM_TASKS.get(task)
    if optimum_task is None:
        raise BadRequestError(f"unknown task {task!r}; one of: {', '.join(OPTIMUM_TASKS)}")
    if quantize not in (None, "int8"):
        raise BadRequestError(f"unknown quantisation {quantize!r}; only int8 is supported")
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise ModelLoadError(f"{src} is not a Hugging Face model directory (no config.json)")
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        raise ModelLoadError(
            f"export needs the 'export' extra (pip install 'modelyard[export]'): {exc}"
        ) from None
    out.mkdir(parents=True, exist_ok=True)
    report("exporting to ONNX (optimum)", 15.0)
    try:
        # Tracer and deprecation warnings speak to exporter developers, not to our users.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(
                str(src),
                output=out,
                task=optimum_task,
                library_name="transformers",
                do_validation=False,
                local_files_only=True,
            )
    except Exception as exc:  # noqa: BLE001 - optimum and torch raise many unrelated types
        raise ModelLoadError(
            f"optimum could not export {src.name}: {type(exc).__name__}: {exc}"
        ) from None
    _copy_side_files(src, out)
    model = out / "model.onnx"
    if not model.is_file():
        raise ModelLoadError(f"optimum wrote no model.onnx into {out}")
    if quantize == "int8":
        report("quantising to int8", 55.0)
        _quantize_int8(model)
    report("validating against the source model (torch)", 70.0)
    diff, compared = validate(src, model, optimum_task)
    if compared and diff > (0.1 if quantize else 1e-3):
        log.warning("exported %s differs from the source by up to %.3e", src.name, diff)
    report("exported", 100.0)
    return ExportReport(out, task, optimum_task, diff, quantize, compared)


def _copy_side_files(src: Path, out: Path) -> None:
    for name in _SIDE_FILES:
        if (src / name).is_file() and not (out / name).exists():
            shutil.copyfile(src / name, out / name)


def _quantize_int8(model: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staged = model.with_name("model.int8.onnx")
    try:
        quantize_dynamic(model, staged, weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001
        staged.unlink(missing_ok=True)
        raise ModelLoadError(f"int8 quantisation failed: {type(exc).__name__}: {exc}") from None
    staged.replace(model)


def validate(src: Path, model: Path, optimum_task: str) -> tuple[float, list[str]]:
    """Run a few sentences through torch and onnxruntime; the largest difference of outputs."""
    import numpy as np
    import onnxruntime as ort
    import torch
    from optimum.exporters.tasks import TasksManager

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = {arg.name: arg for arg in session.get_inputs()}
    plain = {name for name in inputs if not name.startswith("past_key_values.")}
    if (
        not plain <= _TEXT_INPUTS
        or "input_ids" not in plain
        or not (model.parent / "tokenizer.json").is_file()
    ):
        log.warning("%s: only text models are validated; skipping the check", src.name)
        return math.nan, []
    feeds = _text_feeds(model.parent, inputs)
    task = optimum_task.removesuffix("-with-past")
    if task == "auto":
        task = TasksManager.infer_task_from_model(str(src), library_name="transformers")
    torch_model = TasksManager.get_model_from_task(
        task, str(src), framework="pt", library_name="transformers", local_files_only=True
    ).eval()
    names = [o.name for o in session.get_outputs() if not o.name.startswith("present.")]
    got = dict(zip(names, session.run(names, feeds), strict=True))
    with torch.inference_mode():
        kwargs = {k: torch.from_numpy(v) for k, v in feeds.items() if k in plain}
        if any(name.startswith("past_key_values.") for name in inputs):
            kwargs["use_cache"] = False  # type: ignore[assignment]
        expected = torch_model(**kwargs)
    diffs, compared = [], []
    mask = feeds["attention_mask"].astype(bool) if "attention_mask" in feeds else None
    for name, value in got.items():
        reference = expected.get(name) if hasattr(expected, "get") else None
        if reference is None:
            continue
        reference_np = reference.float().numpy()
        delta = np.abs(value.astype(np.float32) - reference_np)
        if mask is not None and delta.ndim == 3 and delta.shape[:2] == mask.shape:
            delta = delta[mask]  # padded positions are free to differ
        diffs.append(float(delta.max()))
        compared.append(name)
    return (max(diffs) if diffs else math.nan), compared


def _text_feeds(root: Path, inputs: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_truncation(64)
    tokenizer.no_padding()
    causal = any(name.startswith("past_key_values.") for name in inputs)
    # Decoders are checked one sentence at a time: no padding to reason about.
    texts = _SENTENCES[:1] if causal else _SENTENCES
    if not causal:
        tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(list(texts))
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    values: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy(),
    }
    feeds = {name: values[name] for name in inputs if name in values}
    for name, arg in inputs.items():
        if name.startswith("past_key_values."):
            _, heads, _, head_dim = arg.shape
            feeds[name] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype=np.float32)
    return feeds
