"""The ``[ui]`` config section: the operators' web console at ``/ui``."""

from __future__ import annotations

from msgspec import Struct

__all__ = ["UiSettings"]


class UiSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    """``[ui]``: the web console served at ``/ui`` from files shipped in the wheel."""

    enabled: bool = True
