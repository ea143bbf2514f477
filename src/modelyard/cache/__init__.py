"""Cache tiers and keys."""

__all__: list[str] = []
