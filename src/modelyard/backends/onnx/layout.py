"""The model directory ``optimum-cli export onnx`` writes: where each file is and what it says."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelyard.core.errors import ModelLoadError

__all__ = ["DEFAULT_FILE", "ModelFiles", "locate"]

DEFAULT_FILE = "model.onnx"
#: Limits past this are "no limit" placeholders (transformers writes 1e30 for unknown).
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class ModelFiles:
    """One model version on disk: the ONNX file and the JSON files beside it."""

    root: Path
    model: Path

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON object beside the model, ``{}`` when absent; ModelLoadError when malformed."""
        path = self.root / name
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{name} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ModelLoadError(f"{name} must hold a JSON object")
        return data

    @property
    def config(self) -> dict[str, Any]:
        return self.read_json("config.json")

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.read_json("tokenizer_config.json")

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.root / "tokenizer.json"
        return path if path.is_file() else None

    def max_length(self, override: int | None) -> int:
        """Tokens per input: the option, else the tightest limit the model files state."""
        if override is not None:
            return override
        limits = [
            self.read_json("sentence_bert_config.json").get("max_seq_length"),
            self.tokenizer_config.get("model_max_length"),
            self.config.get("max_position_embeddings"),
            self.config.get("n_positions"),
        ]
        usable = [int(x) for x in limits if isinstance(x, int | float) and 0 < x < _NO_LIMIT]
        return min(usable) if usable else 512

    def chat_template(self) -> str | None:
        """The chat template from tokenizer_config.json or the files transformers writes now."""
        template = self.tokenizer_config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
        jinja = self.root / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8")
        template = self.read_json("chat_template.json").get("chat_template")
        return template if isinstance(template, str) and template else None

    def special_token(self, name: str) -> str | None:
        """The text of ``bos_token``, ``eos_token`` or ``pad_token``, wherever it is stated."""
        for source in (self.tokenizer_config, self.read_json("special_tokens_map.json")):
            value = source.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
        return None


def locate(path: Path, file: str = DEFAULT_FILE) -> ModelFiles:
    """Find the ONNX file: ``path`` itself, ``path/file``, or the directory's only ``*.onnx``."""
    if path.is_file():
        return ModelFiles(root=path.parent, model=path)
    if not path.is_dir():
        raise ModelLoadError(f"model path {path} does not exist")
    model = path / file
    if model.is_file():
        return ModelFiles(root=path, model=model)
    if file == DEFAULT_FILE:
        found = sorted(p for p in path.glob("*.onnx") if p.is_file())
        if len(found) == 1:
            return ModelFiles(root=path, model=found[0])
        if found:
            names = ", ".join(p.name for p in found)
            raise ModelLoadError(f"{path} has several ONNX files ({names}); set options.file")
    raise ModelLoadError(f"no {file} in {path}")
