"""The ``gguf`` backend plugin: GGUF models through llama.cpp with continuous batching.

Registered through the ``modelyard`` entry-point group like any third-party plugin. The
runtime (llama-cpp-python) is imported only when a model loads; without the ``gguf`` extra
the plugin reports itself skipped and the server carries on.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from modelyard.core.hookspecs import hookimpl
from modelyard.core.plugins import PluginUnavailable

__all__ = ["register_backends"]

#: import name -> distribution, for the message that says what to install.
_REQUIRED = {"llama_cpp": "llama-cpp-python", "gguf": "gguf", "jinja2": "jinja2"}


@hookimpl
def register_backends(register: Callable[[type], None]) -> None:
    """Register ``GGUFBackend`` when llama-cpp-python, gguf and jinja2 are installed."""
    missing = [
        dist for module, dist in _REQUIRED.items() if importlib.util.find_spec(module) is None
    ]
    if missing:
        raise PluginUnavailable(
            f"missing {', '.join(missing)}: pip install 'modelyard[gguf]'"
        )
    from modelyard.backends.llamacpp.backend import GGUFBackend

    register(GGUFBackend)
