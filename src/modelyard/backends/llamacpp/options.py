"""``[models.options]`` of a ``gguf`` model."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

__all__ = ["ChatFormat", "GGUFOptions"]

#: Names of the built-in chat formats (``templates.BUILTIN_CHAT_FORMATS`` holds their source).
ChatFormat = Literal["chatml", "llama-2", "llama-3", "gemma", "mistral-instruct", "phi-3", "zephyr"]


class GGUFOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """How llama.cpp runs one GGUF model; every field has a working default."""

    #: Layers offloaded to the GPU (CUDA, Metal, ...): ``auto`` = all when the build has a GPU
    #: backend, ``all``, or a number (0 keeps everything on the CPU).
    n_gpu_layers: Literal["auto", "all"] | Annotated[int, Meta(ge=0)] = "auto"
    #: GPU that holds the model when several exist.
    main_gpu: Annotated[int, Meta(ge=0)] = 0
    #: Context per slot in tokens (prompt + generation); 0 = the model's training context.
    #: Capped at the training context. KV memory grows with ``n_ctx * parallel``.
    n_ctx: Annotated[int, Meta(ge=0)] = 4096
    #: Sequence slots decoded together (llama.cpp ``n_seq_max``): the continuous batch width.
    parallel: Annotated[int, Meta(ge=1, le=256)] = 4
    #: Requests that may wait for a free slot; beyond it requests get 503 + Retry-After.
    max_queue: Annotated[int, Meta(ge=0)] = 64
    #: Threads for decoding; None = every CPU core.
    n_threads: Annotated[int, Meta(ge=1)] | None = None
    #: Threads for prompt processing; None = ``n_threads``.
    n_threads_batch: Annotated[int, Meta(ge=1)] | None = None
    #: Most tokens one ``llama_decode`` takes (llama.cpp ``n_batch``).
    n_batch: Annotated[int, Meta(ge=8, le=65536)] = 512
    #: Physical micro-batch (llama.cpp ``n_ubatch``).
    n_ubatch: Annotated[int, Meta(ge=8, le=65536)] = 512
    #: Prompt tokens a newcomer may feed per step while other sequences are decoding; bounds
    #: how long a long prompt stalls running streams. An idle engine takes ``n_batch``.
    prefill_chunk: Annotated[int, Meta(ge=1)] = 256
    #: Flash attention: ``auto`` lets llama.cpp decide per device.
    flash_attn: Literal["auto", "on", "off"] = "auto"
    #: One KV buffer shared by all slots.
    kv_unified: bool = False
    #: Keep a finished request's KV cells in its slot and reuse them for the next request
    #: whose prompt starts the same way (llama-server's ``cache_prompt``): a request goes to
    #: the free slot holding its longest prefix and decodes only the rest.
    prefix_cache: bool = True
    #: Shortest shared prefix, in tokens, that counts as a hit; shorter ones are not reused
    #: (not worth sending a request to a slot and wiping the rest of its cached tokens).
    min_prefix_tokens: Annotated[int, Meta(ge=1)] = 16
    #: A named chat format used instead of the file's template (or when it has none).
    chat_format: ChatFormat | None = None
    #: A Jinja chat template used instead of the file's (same sandbox and limits).
    chat_template: str | None = None
    #: Longest a chat template may take to render.
    template_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 1.0
    #: Largest prompt text a chat template may produce, in characters.
    template_max_chars: Annotated[int, Meta(ge=1024)] = 4_000_000
    #: Tokens the presence/frequency penalties look back over.
    penalty_last_n: Annotated[int, Meta(ge=0)] = 64
    #: Embeddings: pooling of token vectors (``model`` = what the GGUF declares).
    pooling: Literal["model", "none", "mean", "cls", "last"] = "model"
    #: Embeddings: scale every vector to unit length.
    normalize: bool = True
