"""The first-party ``onnx`` backend plugin: ONNX Runtime, no torch on the serving path.

Install with ``pip install 'modelyard[onnx]'`` (onnxruntime, tokenizers, numpy). The runtime
is imported when a model loads, never when the plugin registers.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginUnavailable

__all__ = ["register_backends"]

_RUNTIME = ("onnxruntime", "tokenizers", "numpy")


@hookimpl
def register_backends(register: Callable[[type], None]) -> None:
    missing = [name for name in _RUNTIME if importlib.util.find_spec(name) is None]
    if missing:
        raise PluginUnavailable(
            f"install modelyard[onnx] for the onnx backend (missing: {', '.join(missing)})"
        )
    from modelyard.backends.onnx.backend import OnnxBackend

    register(OnnxBackend)
