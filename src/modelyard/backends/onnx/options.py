"""``[models.options]`` of an ``onnx`` model version."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from modelyard.backends.onnx.providers import canonical_provider

__all__ = ["GraphOptimization", "OnnxOptions", "Pooling"]

GraphOptimization = Literal["disable", "basic", "extended", "all"]
Pooling = Literal["mean", "cls"]


class OnnxOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Runtime, session and task options; every field has a working default."""

    #: ``"auto"`` (CUDA -> CoreML -> DirectML -> CPU) or an ordered list ("CUDA", "CPU", ...).
    providers: Literal["auto"] | list[str] = "auto"
    #: Per-provider options, e.g. ``{CUDA = {device_id = 1}, CoreML = {MLComputeUnits = "ALL"}}``.
    provider_options: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    #: Threads inside one operator; None lets onnxruntime pick (one per physical core), or,
    #: with ``concurrent_runs`` > 1, the usable cores divided among the runs.
    intra_op_threads: Annotated[int, Meta(ge=0, le=1024)] | None = None
    #: Batches the engine may run at once (Triton's instance count). ``"auto"``: on the CPU
    #: provider, one per usable core up to 4, the cores split among them; elsewhere 1.
    #: Generation tasks always run one at a time.
    concurrent_runs: Annotated[int, Meta(ge=1, le=256)] | Literal["auto"] = "auto"
    #: With concurrent runs on CPU, keep a second session that uses every core for a batch
    #: that finds no other batch running, so a lone request is not confined to its share of
    #: the cores. It holds the model in memory a second time; false saves that.
    wide_session: bool = True
    #: Threads running independent operators in parallel; None lets onnxruntime pick.
    inter_op_threads: Annotated[int, Meta(ge=0, le=1024)] | None = None
    graph_optimization: GraphOptimization = "all"
    #: Extra onnxruntime session config entries (``SessionOptions.add_session_config_entry``),
    #: e.g. ``{"session.dynamic_block_base" = "4"}``; applied after modelyard's own.
    session_config: dict[str, str] = msgspec.field(default_factory=dict)
    #: Let onnxruntime's worker threads busy-wait for work. Off by default: a server shares
    #: its cores with the event loop and tokenisers, and spinning threads starve them.
    spin_wait: bool = False
    #: Write the optimised graph here (relative paths are inside the model directory).
    optimized_model_path: str | None = None
    #: Embeddings: how token vectors become one vector.
    pooling: Pooling = "mean"
    #: Embeddings: L2-normalise each vector.
    normalize: bool = True
    #: Tokens per input; longer inputs are truncated. None: the model's own limit.
    max_length: Annotated[int, Meta(ge=1, le=1_000_000)] | None = None
    #: Largest number of requests served by one ``infer`` call (one padded session.run).
    max_batch_size: Annotated[int, Meta(ge=1, le=4096)] = 16
    #: The ONNX file inside the model directory.
    file: str = "model.onnx"

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError naming the options path.
        if self.providers != "auto":
            if not self.providers:
                raise ValueError("providers: give at least one provider or 'auto'")
            for name in self.providers:
                canonical_provider(name)
        for name in self.provider_options:
            canonical_provider(name)
        if "/" in self.file or "\\" in self.file or self.file in ("", ".", ".."):
            raise ValueError(f"file: {self.file!r} must be a file name inside the model directory")

    @property
    def provider_list(self) -> list[str] | None:
        """Canonical provider names, or None for ``auto``."""
        if self.providers == "auto":
            return None
        return [canonical_provider(name) for name in self.providers]

    def options_for(self, provider: str) -> dict[str, Any]:
        """The provider's options, whichever spelling the config used for its name."""
        for name, values in self.provider_options.items():
            if canonical_provider(name) == provider:
                return dict(values)
        return {}
