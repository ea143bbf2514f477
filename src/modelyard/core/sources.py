"""Turn a model ``source`` into a local path: plain paths here, ``scheme:`` through plugins."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import ClassVar

from modelyard.core.errors import ModelLoadError
from modelyard.core.integrity import check_pin, split_pin

__all__ = ["Progress", "SourceResolver", "SourceScheme"]

#: ``progress(phase, percent)``: phase names the step, percent runs 0-100.
Progress = Callable[[str, float], None]


class SourceScheme:
    """Base class of a model-source scheme (``pypi:``, ``demo:``, ``s3:``, ...).

    Subclasses set ``name`` (the scheme, without the colon) and override ``resolve``.
    """

    name: ClassVar[str] = ""
    #: True when ``resolve`` checks a ``#sha256=HEX`` pin at the end of its reference itself;
    #: otherwise the resolver strips the pin and hashes the path ``resolve`` returns.
    verifies_pins: ClassVar[bool] = False

    def resolve(self, reference: str, *, cache_dir: Path, progress: Progress) -> Path:
        """Return an existing local path for ``reference`` (the text after ``name:``). Override.

        Runs in a worker thread, so it may block (download, unpack, export). Report long steps
        through ``progress``; raise ``ModelLoadError`` with a message naming the source.
        """
        raise NotImplementedError


class SourceResolver:
    """Resolves a source through the registered schemes; anything else is a local path."""

    def __init__(self, schemes: Mapping[str, type[SourceScheme]]) -> None:
        self._schemes = dict(schemes)

    @property
    def schemes(self) -> list[str]:
        return sorted(self._schemes)

    def __call__(self, source: str, cache_dir: Path, progress: Progress) -> Path:
        """The local path of ``source``; a ``#sha256=HEX`` pin on it must match its content."""
        pinned = source
        source, pin = split_pin(source)
        scheme, sep, rest = source.partition(":")
        # One letter is a Windows drive ("C:\\models"), never a scheme.
        if sep and len(scheme) > 1:
            found = self._schemes.get(scheme)
            if found is not None:
                if found.verifies_pins:
                    reference = pinned.partition(":")[2]
                    return found().resolve(reference, cache_dir=cache_dir, progress=progress)
                path = found().resolve(rest, cache_dir=cache_dir, progress=progress)
                return check_pin(path, pin, pinned)
            if scheme == "file":
                source = rest
            elif not Path(source).exists():
                known = ", ".join(f"{s}:" for s in ["file", *self.schemes])
                raise ModelLoadError(
                    f"model source {source!r}: unknown scheme {scheme + ':'!r} (known: {known})"
                )
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model source {source!r} does not exist")
        return check_pin(path.resolve(), pin, pinned)
