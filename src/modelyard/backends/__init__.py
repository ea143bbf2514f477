"""First-party backend plugins; each imports its runtime lazily and skips cleanly without it."""

__all__: list[str] = []
