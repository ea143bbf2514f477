"""First-party plugins that are not backends (auth providers, ...)."""

__all__: list[str] = []
