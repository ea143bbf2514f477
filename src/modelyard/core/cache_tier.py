"""The ``CacheTier`` extension point: one level of the response cache."""

from __future__ import annotations

from typing import Any, ClassVar

import msgspec

from modelyard.core.backend import NoOptions

__all__ = ["CacheTier"]


class CacheTier:
    """Base class of a cache tier storing raw bytes under opaque byte keys.

    Subclasses set ``name`` and ``options_type`` and override ``get``, ``set`` and ``delete``.
    A tier never pickles: values are bytes in, bytes out.
    """

    name: ClassVar[str] = ""
    options_type: ClassVar[type[msgspec.Struct]] = NoOptions

    def __init__(self, options: Any) -> None:
        self.options = options

    async def get(self, key: bytes) -> bytes | None:
        """Return the stored value, or None on a miss. Override."""
        raise NotImplementedError

    async def set(self, key: bytes, value: bytes) -> None:
        """Store a value. Override."""
        raise NotImplementedError

    async def delete(self, key: bytes) -> None:
        """Remove a value if present. Override."""
        raise NotImplementedError

    async def clear(self) -> None:
        """Remove every value. Override."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release resources. Override when there are any."""
