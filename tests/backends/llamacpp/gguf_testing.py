"""Helpers for the gguf backend tests: a tiny llama GGUF writer and a loaded-backend context.

The tiny model (2 layers, 64 wide, a 300-token SentencePiece vocabulary with byte fallback)
has random weights: its text is a deterministic word salad, which is all the engine tests
need. It is written in milliseconds with the ``gguf`` package.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec

from modelyard.core.backend import LoadContext
from modelyard.core.types import Task

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
PIECES = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁the", "▁a", "▁cat", "▁dog", "▁sat", "▁on",
          "▁mat", "▁hello", "▁world", "er", "in", "on", "an", "re", "▁to", "▁of", "."]


def write_tiny_llama(
    path: Path,
    *,
    chat_template: str | None = CHATML,
    seed: int = 0,
    n_embd: int = 64,
    context_length: int = 512,
    pooling_type: int | None = None,
) -> Path:
    """A valid llama-architecture GGUF with random F32 weights; returns ``path``."""
    import gguf
    import numpy as np

    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + PIECES
    types = (
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL,
         gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * len(PIECES)
    )
    scores = [0.0] * (len(SPECIALS) + 256) + [float(len(p)) for p in PIECES]
    n_vocab, n_head, n_head_kv, n_ff, n_layer = len(tokens), 4, 2, 128, 2
    head_dim = n_embd // n_head

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama-test")
    writer.add_context_length(context_length)
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    if pooling_type is not None:
        writer.add_pooling_type(gguf.PoolingType(pooling_type))

    rng = np.random.default_rng(seed)

    def weights(*shape: int, scale: float = 0.3) -> Any:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer.add_tensor("token_embd.weight", weights(n_vocab, n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    # Only word pieces get output weights: greedy text stays readable (no stray bytes) and
    # never ends by chance (tests force an end with logit_bias on </s>).
    output = weights(n_vocab, n_embd, scale=1.0)
    output[: len(SPECIALS) + 256] = 0.0
    writer.add_tensor("output.weight", output)
    for i in range(n_layer):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weights(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weights(n_head_kv * head_dim, n_embd))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weights(n_embd, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weights(n_ff, n_embd))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weights(n_embd, n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MakeGGUF = Callable[..., Path]


def load_context(path: Path, task: Task | None, **options: Any) -> LoadContext:
    from modelyard.backends.llamacpp.options import GGUFOptions

    return LoadContext(
        model="m", version="1", task=task, source=str(path), path=path,
        options=msgspec.convert(options, GGUFOptions),
    )


@contextlib.asynccontextmanager
async def loaded(
    path: Path, task: Task | None = Task.COMPLETION, **options: Any
) -> AsyncIterator[Any]:
    """A loaded ``GGUFBackend``, unloaded afterwards.

    One thread unless told otherwise: the suite shares two cores with other work, and a
    multi-threaded decode waits at every op for its slowest, possibly descheduled, thread.
    """
    from modelyard.backends.llamacpp.backend import GGUFBackend

    options.setdefault("n_threads", 1)
    options.setdefault("n_ctx", 256)
    backend = GGUFBackend(load_context(path, task, **options))
    await backend.load()
    try:
        yield backend
    finally:
        await backend.unload()
