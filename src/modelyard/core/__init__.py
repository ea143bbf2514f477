"""Plugin core, configuration, registry, engine and the inference service; no HTTP here.

The public names are re-exported from ``modelyard``; modules here are internal.
"""

__all__: list[str] = []
