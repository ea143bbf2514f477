"""Execution providers: names, the ``auto`` order, and session creation with fallback to CPU."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["AUTO_ORDER", "CPU", "canonical_provider", "open_with_fallback", "plan_providers"]

log = logging.getLogger("modelyard.backends.onnx")

CPU = "CPUExecutionProvider"
_ALIASES = {
    "cpu": CPU,
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "directml": "DmlExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}
#: What ``providers = "auto"`` tries, best first; CPU always closes the list.
AUTO_ORDER = (
    "CUDAExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    CPU,
)


def canonical_provider(name: str) -> str:
    """``"cuda"``/``"CUDA"``/``"CUDAExecutionProvider"`` -> ``"CUDAExecutionProvider"``."""
    if name.endswith("ExecutionProvider"):
        return name
    full = _ALIASES.get(name.strip().lower())
    if full is None:
        known = ", ".join(sorted({*_ALIASES, "<Name>ExecutionProvider"}))
        raise ValueError(f"unknown execution provider {name!r}; known: {known}")
    return full


def plan_providers(
    requested: Sequence[str] | None, available: Sequence[str]
) -> tuple[list[str], list[str]]:
    """The providers worth trying, in order, ending with CPU; plus warnings for those skipped."""
    wanted = list(AUTO_ORDER) if requested is None else list(requested)
    plan: list[str] = []
    warnings: list[str] = []
    for name in wanted:
        if name in plan:
            continue
        if name in available:
            plan.append(name)
        elif requested is not None:
            # Under auto, a missing GPU provider is the normal case, not worth a warning.
            warnings.append(f"{name} is not available in this onnxruntime build")
    if CPU not in plan:
        plan.append(CPU)
    return plan, warnings


def open_with_fallback(
    plan: Sequence[str],
    open_session: Callable[[list[str]], Any],
) -> tuple[Any, list[str]]:
    """Open a session on ``plan``; a provider that fails to initialise gives way to the next.

    ``open_session(providers)`` builds the session; the error of the last (CPU) attempt is
    raised, since CPU failing means the model itself is the problem.
    """
    warnings: list[str] = []
    for start, provider in enumerate(plan):
        attempt = list(plan[start:])
        if attempt[-1] != CPU:
            attempt.append(CPU)
        if provider == CPU or start == len(plan) - 1:
            return open_session(attempt), warnings
        try:
            return open_session(attempt), warnings
        except Exception as exc:  # noqa: BLE001 - any provider failure means: try the next one
            warnings.append(f"{provider} failed to initialise ({type(exc).__name__}: {exc})")
    raise AssertionError("unreachable: the plan always ends with CPU")


def report_fallback(requested: Sequence[str], active: Sequence[str]) -> list[str]:
    """Warnings for providers that were tried but are not among the session's active ones."""
    return [
        f"{name} was requested but the session runs on {', '.join(active)}"
        for name in requested
        if name not in active and name != CPU
    ]


def warn(model: str, messages: Sequence[str]) -> None:
    for message in messages:
        log.warning("model %s: %s; falling back", model, message)
