"""The text-generation tasks: an own KV-cache decoding loop over an optimum decoder-with-past."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from modelyard.backends.onnx.layout import ModelFiles
from modelyard.backends.onnx.tensor import numpy_dtype
from modelyard.backends.onnx.text import load_tokenizer
from modelyard.core.errors import BadRequestError, ModelLoadError
from modelyard.core.types import (
    ChatRequest,
    CompletionRequest,
    FinishReason,
    GenerationParams,
    GenerationResult,
)

__all__ = ["Decoder", "GenerationTask", "sample_token"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class _PastInput:
    name: str
    present: str
    shape: tuple[int, ...]  # batch 1, past length 0
    dtype: Any


def _past_inputs(session: Any, config: dict[str, Any]) -> list[_PastInput]:
    outputs = {o.name for o in session.get_outputs()}
    found = []
    for arg in session.get_inputs():
        match = _PAST.match(arg.name)
        if match is None:
            continue
        present = f"present.{match[1]}.{match[2]}"
        if present not in outputs:
            raise ModelLoadError(f"{arg.name} has no matching {present} output")
        dims = list(arg.shape)
        if len(dims) != 4:
            raise ModelLoadError(f"{arg.name} must be [batch, heads, past, head_dim]")
        heads = dims[1] if isinstance(dims[1], int) else _config_heads(config)
        head_dim = dims[3] if isinstance(dims[3], int) else _config_head_dim(config)
        found.append(_PastInput(arg.name, present, (1, heads, 0, head_dim), numpy_dtype(arg.type)))
    return sorted(found, key=lambda p: p.name)


def _config_heads(config: dict[str, Any]) -> int:
    for key in ("num_key_value_heads", "num_attention_heads", "n_head"):
        if isinstance(config.get(key), int):
            return int(config[key])
    raise ModelLoadError("cannot tell the number of attention heads from the graph or config.json")


def _config_head_dim(config: dict[str, Any]) -> int:
    if isinstance(config.get("head_dim"), int):
        return int(config["head_dim"])
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    if isinstance(hidden, int) and isinstance(heads, int) and heads:
        return hidden // heads
    raise ModelLoadError("cannot tell the attention head size from the graph or config.json")


def _token_ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def sample_token(
    logits: npt.NDArray[np.float32],
    params: GenerationParams,
    rng: np.random.Generator,
    counts: dict[int, int],
) -> int:
    """Pick the next token: penalties and bias, then greedy or temperature/top-k/top-p sampling."""
    logits = logits.astype(np.float64, copy=True)
    if params.logit_bias:
        for token, bias in params.logit_bias.items():
            if 0 <= token < logits.shape[0]:
                logits[token] += bias
    if counts and (params.presence_penalty or params.frequency_penalty):
        ids = np.fromiter(counts.keys(), dtype=np.int64)
        seen = np.fromiter(counts.values(), dtype=np.float64)
        logits[ids] -= seen * params.frequency_penalty + params.presence_penalty
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    logits = logits / params.temperature
    if params.top_k:
        kth = np.partition(logits, -min(params.top_k, logits.shape[0]))[
            -min(params.top_k, logits.shape[0])
        ]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[0], p=probs))


@dataclass
class _Text:
    """Incremental detokenisation that never emits part of a stop sequence or a split character."""

    tokenizer: Any
    stops: Sequence[str]
    ids: list[int] = field(default_factory=list)
    emitted: int = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return the text now safe to emit and whether a stop sequence was hit."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        if cut is not None:
            return self._emit(text[:cut]), True
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return "", False
        held = max((self._overlap(text, s) for s in self.stops), default=0)
        return self._emit(text[: len(text) - held]), False

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._emit(text.rstrip("\ufffd"))

    def _emit(self, upto: str) -> str:
        piece = upto[self.emitted :]
        self.emitted = max(self.emitted, len(upto))
        return piece

    def _stop_at(self, text: str) -> int | None:
        window = max((len(s) for s in self.stops), default=0)
        start = max(0, self.emitted - window)
        hits = [i for s in self.stops if s and (i := text.find(s, start)) >= 0]
        return min(hits) if hits else None

    @staticmethod
    def _overlap(text: str, stop: str) -> int:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if stop.startswith(text[-size:]):
                return size
        return 0


class Decoder:
    """One generation: prompt prefill, then one token per ``step`` with the KV cache."""

    def __init__(self, task: GenerationTask, prompt: list[int], params: GenerationParams) -> None:
        self.task = task
        self.params = params
        self.prompt_tokens = len(prompt)
        room = task.context - len(prompt)
        if room <= 0:
            raise BadRequestError(
                f"the prompt has {len(prompt)} tokens; the model's context is {task.context}"
            )
        self.limit = min(room, params.max_tokens or room)
        self.rng = np.random.default_rng(params.seed)
        self.counts: dict[int, int] = {}
        self.completion_tokens = 0
        self.text = _Text(task.tokenizer, params.stop)
        self.finish: FinishReason | None = None
        self._pending = np.array([prompt], dtype=np.int64)
        self._past = {p.name: np.zeros(p.shape, dtype=p.dtype) for p in task.past}
        self._position = 0

    def step(self) -> str:
        """Run the model once and return the new text; ``finish`` is set when done."""
        logits = self._forward()
        token = sample_token(logits, self.params, self.rng, self.counts)
        if token in self.task.eos:
            self.finish = "stop"
            return self.text.flush()
        self.completion_tokens += 1
        self.counts[token] = self.counts.get(token, 0) + 1
        piece, stopped = self.text.push(token)
        if stopped:
            self.finish = "stop"
        elif self.completion_tokens >= self.limit:
            self.finish = "length"
            piece += self.text.flush()
        self._pending = np.array([[token]], dtype=np.int64)
        return piece

    def _forward(self) -> npt.NDArray[np.float32]:
        ids = self._pending
        length = ids.shape[1]
        feeds: dict[str, npt.NDArray[Any]] = {"input_ids": ids, **self._past}
        total = self._position + length
        if "attention_mask" in self.task.inputs:
            feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in self.task.inputs:
            feeds["position_ids"] = np.arange(self._position, total, dtype=np.int64)[None, :]
        names = ["logits", *(p.present for p in self.task.past)]
        logits, *presents = self.task.session.run(names, feeds)
        self._past = {p.name: value for p, value in zip(self.task.past, presents, strict=True)}
        self._position = total
        return np.asarray(logits[0, -1], dtype=np.float32)


class GenerationTask:
    """Completion (and chat, when a chat template ships) over a decoder exported with past."""

    def __init__(self, session: Any, files: ModelFiles) -> None:
        self.session = session
        self.inputs = {arg.name for arg in session.get_inputs()}
        if "input_ids" not in self.inputs or "logits" not in {
            o.name for o in session.get_outputs()
        }:
            raise ModelLoadError(
                "a text-generation model needs an input_ids input and logits output"
            )
        config = files.config
        self.past = _past_inputs(session, config)
        if not self.past:
            raise ModelLoadError(
                "the model has no past_key_values inputs; export it with "
                "--task text-generation (optimum's text-generation-with-past)"
            )
        self.tokenizer = load_tokenizer(files)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.context = files.max_length(None)
        self.eos = _token_ids(config.get("eos_token_id"))
        self.eos |= _token_ids(files.read_json("generation_config.json").get("eos_token_id"))
        self.special = {k: files.special_token(k) or "" for k in ("bos_token", "eos_token")}
        eos_text = self.special["eos_token"]
        if eos_text and self.tokenizer.token_to_id(eos_text) is not None:
            self.eos.add(int(self.tokenizer.token_to_id(eos_text)))
        self.chat_template = files.chat_template()

    # -- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, request: ChatRequest | CompletionRequest) -> list[int]:
        if isinstance(request, CompletionRequest):
            return list(self.tokenizer.encode(request.prompt).ids)
        text = self.render_chat(request)
        # The template already placed any BOS it wants.
        return list(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def render_chat(self, request: ChatRequest) -> str:
        if self.chat_template is None:
            raise BadRequestError("this model has no chat template; use completions")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise BadRequestError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=True, **self.special
            )
        except TemplateError as exc:
            raise BadRequestError(f"chat template failed: {exc}") from None

    # -- running ---------------------------------------------------------------------------

    def start(self, request: ChatRequest | CompletionRequest) -> Decoder:
        return Decoder(self, self.prompt_ids(request), request.params)

    def generate(self, request: ChatRequest | CompletionRequest) -> GenerationResult:
        decoder = self.start(request)
        pieces = [decoder.step()]
        while decoder.finish is None:
            pieces.append(decoder.step())
        return GenerationResult(
            text="".join(pieces),
            finish_reason=decoder.finish,
            prompt_tokens=decoder.prompt_tokens,
            completion_tokens=decoder.completion_tokens,
        )

    def run(
        self, batch: Sequence[ChatRequest | CompletionRequest]
    ) -> list[GenerationResult | Exception]:
        results: list[GenerationResult | Exception] = []
        for request in batch:
            try:
                results.append(self.generate(request))
            except BadRequestError as exc:
                results.append(exc)
        return results
