"""The Litestar HTTP layer: thin controllers over ``InferenceService``."""

from modelyard.api.app import create_app

__all__ = ["create_app"]
