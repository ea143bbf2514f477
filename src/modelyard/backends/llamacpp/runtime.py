"""A thin typed layer over llama-cpp-python's low-level bindings (``llama_cpp.llama_cpp``).

``LlamaRuntime`` holds one model, one context with ``n_seq_max`` sequence slots and one
``llama_batch``. After loading, only the engine thread calls it, except ``tokenize`` and
``token_text``, which read the immutable vocabulary and are safe from any thread (llama.cpp's
own server tokenizes in its HTTP threads too).
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modelyard.backends.llamacpp.options import GGUFOptions
from modelyard.core.errors import BadRequestError, ModelLoadError
from modelyard.core.types import GenerationParams

__all__ = ["BatchEntry", "LlamaRuntime", "describe_devices"]

log = logging.getLogger(__name__)
llama_log = logging.getLogger("modelyard.llama_cpp")

#: (sequence id, token, position, wants logits)
BatchEntry = tuple[int, int, int, bool]

_FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}
_POOLING = {"model": -1, "none": 0, "mean": 1, "cls": 2, "last": 3}
_POOLING_RANK = 4
# ggml_backend_dev_type
_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
# ggml_log_level: 1 debug, 2 info (chatty load reports: debug here), 3 warn, 4 error, 5 "continue"
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


def _bindings() -> Any:
    import llama_cpp

    return llama_cpp


def _route_llama_logs(lib: Any) -> None:
    """Send llama.cpp's log lines to Python logging instead of stderr (info becomes debug)."""
    if getattr(_route_llama_logs, "callback", None) is not None:
        return

    @lib.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        python_level = _LOG_LEVELS.get(level, logging.DEBUG)
        if llama_log.isEnabledFor(python_level):
            llama_log.log(python_level, "%s", text.decode("utf-8", "replace").rstrip())

    # The callback must outlive every model: keep it on the function, never collected.
    _route_llama_logs.callback = callback  # type: ignore[attr-defined]
    lib.llama_log_set(callback, ctypes.c_void_p(0))


#: Short llama.cpp calls the engine makes several times per step (microseconds each).
_SHORT_CALLS = ("llama_sampler_sample", "llama_get_logits_ith", "llama_vocab_is_eog",
                "llama_token_to_piece", "llama_memory_seq_rm", "llama_sampler_free")


def _gil_holding_twins(lib: Any) -> dict[str, Any]:
    """Twins of the short calls that keep the GIL (loaded through ``ctypes.PyDLL``).

    A ctypes ``CDLL`` call releases the GIL and must win it back afterwards; while the event
    loop thread is busy streaming, that can take a whole switch interval (5 ms), several
    times per decode step. Only ``llama_decode``, which runs for milliseconds, should let go.
    """
    path = getattr(getattr(lib.llama_cpp, "_lib", None), "_name", None)
    twins = {name: getattr(lib, name) for name in _SHORT_CALLS if hasattr(lib, name)}
    if not path:
        return twins
    try:
        holding = ctypes.PyDLL(path)
        for name, releasing in list(twins.items()):
            fast = getattr(holding, name)
            fast.argtypes, fast.restype = releasing.argtypes, releasing.restype
            twins[name] = fast
    except (OSError, AttributeError):
        log.debug("llama.cpp calls will release the GIL", exc_info=True)
    return twins


def describe_devices() -> list[dict[str, str]]:
    """The ggml backend devices this llama.cpp build can use (CPU, CUDA0, Metal...)."""
    try:
        from llama_cpp import _ggml

        lib = _ggml.libggml
        count = ctypes.CFUNCTYPE(ctypes.c_size_t)(("ggml_backend_dev_count", lib))
        get = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t)(("ggml_backend_dev_get", lib))
        name = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(("ggml_backend_dev_name", lib))
        desc = ctypes.CFUNCTYPE(ctypes.c_char_p, ctypes.c_void_p)(
            ("ggml_backend_dev_description", lib)
        )
        kind = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(("ggml_backend_dev_type", lib))
    except (ImportError, AttributeError, OSError):
        return []
    devices = []
    for index in range(count()):
        dev = get(index)
        devices.append({
            "name": (name(dev) or b"").decode(errors="replace"),
            "description": (desc(dev) or b"").decode(errors="replace"),
            "type": _DEV_TYPES.get(kind(dev), "unknown"),
        })
    return devices


class LlamaRuntime:
    """One llama.cpp model and context; see the module docstring for who may call what."""

    def __init__(self, path: Path, options: GGUFOptions, *, embeddings: bool) -> None:
        self.lib = _bindings()
        _route_llama_logs(self.lib)
        self.lib.llama_backend_init()
        self.path = path
        self.options = options
        self.embeddings = embeddings
        self.model: Any = None
        self.ctx: Any = None
        self.batch: Any = None
        self.gpu_layers = self._gpu_layers(options.n_gpu_layers)
        self._load_model()
        try:
            self._create_context()
        except BaseException:
            self.close()
            raise
        import numpy

        self._np = numpy
        self._call = _gil_holding_twins(self.lib)
        self._piece_cache: dict[int, bytes] = {}
        self._eog_cache: dict[int, bool] = {}
        self._piece_buffer = ctypes.create_string_buffer(256)
        self._warm_up()

    # -- loading -------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Decode one token at load: the weights are paged in and the graph is built now,
        not during the first request (seconds when the page cache has dropped the file)."""
        token = self.special_token("bos")
        status = self.decode([(0, 0 if token is None else token, 0, True)])
        self.forget(0)
        if status != 0:
            log.warning("warm-up decode of %s returned %d", self.path.name, status)

    def _gpu_layers(self, requested: int | str) -> int:
        if requested == "all":
            return -1
        if requested == "auto":
            return -1 if self.lib.llama_supports_gpu_offload() else 0
        return int(requested)

    def _load_model(self) -> None:
        lib = self.lib
        params = lib.llama_model_default_params()
        params.n_gpu_layers = self.gpu_layers
        params.main_gpu = self.options.main_gpu
        load = getattr(lib, "llama_model_load_from_file", None) or lib.llama_load_model_from_file
        self.model = load(str(self.path).encode(), params)
        if not self.model:
            raise ModelLoadError(
                f"llama.cpp could not load {self.path.name} (unsupported architecture or "
                "corrupt tensors; set the modelyard.llama_cpp logger to DEBUG for its log)"
            )
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_layer = int(lib.llama_model_n_layer(self.model))
        self.n_embd = int(lib.llama_model_n_embd(self.model))
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self.model))
        #: Sliding-window attention span (0: none); such a cache drops old cells.
        n_swa = getattr(lib, "llama_model_n_swa", None)
        self.n_swa = int(n_swa(self.model)) if n_swa is not None else 0
        self.add_bos = bool(lib.llama_vocab_get_add_bos(self.vocab))
        self.encoder_only = bool(
            lib.llama_model_has_encoder(self.model) and not lib.llama_model_has_decoder(self.model)
        )

    def _create_context(self) -> None:
        lib, opts = self.lib, self.options
        params = lib.llama_context_default_params()
        per_seq = opts.n_ctx or self.n_ctx_train
        if self.n_ctx_train:
            per_seq = min(per_seq, self.n_ctx_train)
        slots = opts.parallel
        params.n_ctx = per_seq * slots
        params.n_seq_max = slots
        params.n_batch = opts.n_batch
        # Non-causal (encoder) embedding models must see a whole input in one micro-batch.
        params.n_ubatch = opts.n_batch if self.embeddings else min(opts.n_ubatch, opts.n_batch)
        threads = opts.n_threads or os.cpu_count() or 1
        params.n_threads = threads
        params.n_threads_batch = opts.n_threads_batch or threads
        params.embeddings = self.embeddings
        if self.embeddings:
            params.pooling_type = _POOLING[opts.pooling]
            _set_if_present(params, "n_outputs_max_per_seq", 0)
        if hasattr(params, "flash_attn_type"):
            params.flash_attn_type = _FLASH_ATTN[opts.flash_attn]
        _set_if_present(params, "kv_unified", opts.kv_unified or self.embeddings)
        params.no_perf = True
        init = getattr(lib, "llama_init_from_model", None) or lib.llama_new_context_with_model
        self.ctx = init(self.model, params)
        if not self.ctx:
            raise ModelLoadError(
                f"llama.cpp could not create a context of {params.n_ctx} tokens "
                f"({slots} slots x {per_seq}); lower n_ctx or parallel"
            )
        self.n_seq_max = slots
        # A unified KV buffer reports the whole pool per sequence; each slot keeps its share,
        # so the pool can never run out while every sequence stays within its own.
        share = int(lib.llama_n_ctx(self.ctx)) // slots
        self.n_ctx_seq = min(int(_n_ctx_seq(lib, self.ctx, slots)), share)
        self.n_batch = int(lib.llama_n_batch(self.ctx))
        self.threads = threads
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self._memory = lib.llama_get_memory(self.ctx) if hasattr(lib, "llama_get_memory") else None
        #: llama.cpp's own total of the model's tensors.
        self.weights_bytes = int(lib.llama_model_size(self.model))
        self.kv_cache_bytes = self._kv_cache_bytes(int(lib.llama_n_ctx(self.ctx)))

    def _kv_cache_bytes(self, n_ctx: int) -> int:
        """The KV cache the context allocated: K and V of every layer for every cell, in
        llama.cpp's default f16 (2 bytes); an estimate, since llama.cpp does not report it
        (sliding-window layers hold less). Encoder-only models keep no cache."""
        lib = self.lib
        if self.encoder_only or not hasattr(lib, "llama_model_n_head"):
            return 0
        n_head = int(lib.llama_model_n_head(self.model))
        if n_head <= 0:  # a recurrent model (Mamba, RWKV): its state is small and fixed
            return 0
        n_head_kv = (
            int(lib.llama_model_n_head_kv(self.model))
            if hasattr(lib, "llama_model_n_head_kv") else n_head
        )
        head_dim = self.n_embd // n_head
        return n_ctx * self.n_layer * 2 * n_head_kv * head_dim * 2

    def close(self) -> None:
        """Free the batch, context and model (engine thread, after its last decode)."""
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            free = getattr(lib, "llama_model_free", None) or lib.llama_free_model
            free(self.model)
            self.model = None

    # -- vocabulary (any thread) ---------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        capacity = len(raw) + 8
        tokens = (ctypes.c_int32 * capacity)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), tokens, capacity, add_special,
                                    parse_special)
        if n < 0:
            capacity = -n
            tokens = (ctypes.c_int32 * capacity)()
            n = self.lib.llama_tokenize(self.vocab, raw, len(raw), tokens, capacity, add_special,
                                        parse_special)
        if n < 0:
            raise BadRequestError("prompt could not be tokenized")
        return list(tokens[:n])

    def token_text(self, token: int | None) -> str:
        """The raw text of a (special) token, as chat templates expect ``bos_token``."""
        if token is None or not 0 <= token < self.n_vocab:
            return ""
        raw = self.lib.llama_vocab_get_text(self.vocab, token)
        return (raw or b"").decode("utf-8", errors="replace")

    def special_token(self, which: str) -> int | None:
        token = int(getattr(self.lib, f"llama_vocab_{which}")(self.vocab))
        return token if token >= 0 else None

    # -- engine thread only ---------------------------------------------------------------

    def piece(self, token: int) -> bytes:
        """The bytes a generated token adds to the text (special tokens render as nothing)."""
        cached = self._piece_cache.get(token)
        if cached is not None:
            return cached
        to_piece = self._call["llama_token_to_piece"]
        buffer = self._piece_buffer
        n = to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = to_piece(self.vocab, token, buffer, len(buffer), 0, False)
        piece = buffer.raw[: max(n, 0)]
        self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        cached = self._eog_cache.get(token)
        if cached is None:
            cached = self._eog_cache[token] = bool(
                self._call["llama_vocab_is_eog"](self.vocab, token)
            )
        return cached

    def decode(self, entries: Sequence[BatchEntry]) -> int:
        """One ``llama_decode`` over tokens of any number of sequences; llama.cpp's status."""
        batch = self.batch
        token, pos, n_seq_id, seq_id, logits = (
            batch.token, batch.pos, batch.n_seq_id, batch.seq_id, batch.logits
        )
        for i, (seq, tok, position, wants) in enumerate(entries):
            token[i] = tok
            pos[i] = position
            n_seq_id[i] = 1
            seq_id[i][0] = seq
            logits[i] = wants
        batch.n_tokens = len(entries)
        if self.encoder_only:
            return int(self.lib.llama_encode(self.ctx, batch))
        return int(self.lib.llama_decode(self.ctx, batch))

    def sample(self, sampler: Any, index: int) -> int:
        """Sample (and accept) the next token from the logits of batch entry ``index``."""
        if sampler is None:  # plain greedy: an argmax over the logits, no candidate array
            logits = self._call["llama_get_logits_ith"](self.ctx, index)
            return int(self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        return int(self._call["llama_sampler_sample"](sampler, self.ctx, index))

    def new_sampler(self, params: GenerationParams) -> Any:
        """A sampler chain for one sequence: bias, penalties, then greedy or top-k/top-p/temp.

        None for plain greedy decoding, which ``sample`` does as an argmax: llama.cpp's greedy
        sampler would first copy the whole vocabulary (262k entries for Gemma) per token.
        """
        plain = not (params.logit_bias or params.presence_penalty or params.frequency_penalty)
        if params.temperature == 0.0 and plain:
            return None
        lib = self.lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if params.logit_bias:
            items = (lib.llama_logit_bias * len(params.logit_bias))()
            for item, (token, bias) in zip(items, params.logit_bias.items(), strict=True):
                item.token, item.bias = token, bias
            lib.llama_sampler_chain_add(
                chain, lib.llama_sampler_init_logit_bias(self.n_vocab, len(items), items)
            )
        if params.presence_penalty or params.frequency_penalty:
            penalties = [self.options.penalty_last_n, 1.0, params.frequency_penalty,
                         params.presence_penalty]
            init = lib.llama_sampler_init_penalties
            if len(init.argtypes or ()) == 5:  # llama.cpp builds since late 2025 take n_vocab first
                penalties.insert(0, self.n_vocab)
            lib.llama_sampler_chain_add(chain, init(*penalties))
        if params.temperature == 0.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
            return chain
        if params.top_k:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
        return chain

    def free_sampler(self, sampler: Any) -> None:
        if sampler is not None:
            self._call["llama_sampler_free"](sampler)

    def forget(self, seq: int) -> None:
        """Drop every KV cell of sequence ``seq`` so its slot starts clean."""
        lib = self.lib
        if self._memory is not None:
            self._call["llama_memory_seq_rm"](self._memory, seq, -1, -1)
        elif hasattr(lib, "llama_kv_self_seq_rm"):
            lib.llama_kv_self_seq_rm(self.ctx, seq, -1, -1)
        else:
            lib.llama_kv_cache_seq_rm(self.ctx, seq, -1, -1)

    def keep_prefix(self, seq: int, keep: int, cached: int) -> int:
        """Drop the KV cells of ``seq`` from position ``keep`` on; the cells still usable.

        ``cached`` is how many positions the cells held. As llama-server does, the whole
        sequence is cleared (0 returned) when llama.cpp cannot cut it there (recurrent or
        hybrid memory) or when a sliding-window cache has already dropped cells that the
        positions after ``keep`` need to attend to.
        """
        if keep <= 0 or self._memory is None:
            self.forget(seq)
            return 0
        if keep < cached:
            window = max(1, self.n_swa)  # no sliding window: every cell stays
            pos_min = int(self.lib.llama_memory_seq_pos_min(self._memory, seq))
            if pos_min < 0 or pos_min > max(0, keep - window):
                self.forget(seq)
                return 0
        if not self._call["llama_memory_seq_rm"](self._memory, seq, keep, -1):
            self.forget(seq)
            return 0
        return keep

    def sequence_embedding(self, seq: int, index: int) -> list[float]:
        """The pooled embedding of ``seq`` (or, unpooled, of batch entry ``index``)."""
        lib = self.lib
        pointer = lib.llama_get_embeddings_seq(self.ctx, seq)
        if not pointer:
            pointer = lib.llama_get_embeddings_ith(self.ctx, index)
        if not pointer:
            raise RuntimeError("llama.cpp returned no embedding")
        size = self.n_embd
        if lib.llama_pooling_type(self.ctx) == _POOLING_RANK:  # rerankers: class scores
            size = max(1, int(lib.llama_model_n_cls_out(self.model)))
        return [float(x) for x in pointer[:size]]

    # -- description ---------------------------------------------------------------------

    def device(self) -> str:
        """Where the weights run: ``CPU``, or the accelerator(s) layers were offloaded to."""
        if self.gpu_layers == 0 or not self.lib.llama_supports_gpu_offload():
            return "CPU"
        accelerators = [d for d in describe_devices() if d["type"] in ("gpu", "igpu", "accel")]
        if not accelerators:
            return "CPU"
        # ggml names them CUDA0, Metal, Vulkan0, ...; the description is the card.
        return ", ".join(f"{d['name']} ({d['description']})" for d in accelerators)

    def offloaded_layers(self) -> int:
        if self.device() == "CPU":
            return 0
        total = self.n_layer + 1  # the output layer counts too
        return total if self.gpu_layers < 0 else min(self.gpu_layers, total)


def _set_if_present(params: Any, field: str, value: Any) -> None:
    if any(name == field for name, *_ in type(params)._fields_):
        setattr(params, field, value)


def _n_ctx_seq(lib: Any, ctx: Any, slots: int) -> int:
    if hasattr(lib, "llama_n_ctx_seq"):
        return int(lib.llama_n_ctx_seq(ctx))
    return int(lib.llama_n_ctx(ctx)) // slots
