"""``SourceSchemeConformance``: a known reference resolves to a path; an unknown one is named."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import pytest

from modelyard.core.errors import ModelLoadError
from modelyard.core.sources import SourceResolver, SourceScheme
from modelyard.testing.conformance._common import (
    ConformanceError,
    host_for_entry_point,
    provided_by,
)

__all__ = ["SourceSchemeConformance"]

_SCHEME_NAME = re.compile(r"^[a-z][a-z0-9+.-]+$")


class SourceSchemeConformance:
    """The model-source scheme contract as pytest tests: subclass it as ``Test...``.

    Set ``scheme``, ``known_references`` (text after ``name:`` that resolves here, offline)
    and ``unknown_references`` (ones that must fail with ``ModelLoadError`` naming them).
    """

    #: The SourceScheme subclass under test.
    scheme: ClassVar[type[SourceScheme] | None] = None
    #: The entry point in the ``modelyard`` group that registers it; None skips the check.
    entry_point: ClassVar[str | None] = None
    #: References (without the ``name:`` prefix) that resolve to an existing local path.
    known_references: ClassVar[Sequence[str]] = ()
    #: References that do not exist.
    unknown_references: ClassVar[Sequence[str]] = ()

    def scheme_class(self) -> type[SourceScheme]:
        if self.scheme is None:
            raise ConformanceError("set scheme (the SourceScheme subclass)")
        return self.scheme

    def make_scheme(self) -> SourceScheme:
        return self.scheme_class()()

    def test_entry_point_registers_the_scheme(self) -> None:
        if self.entry_point is None:
            pytest.skip("entry_point is not set")
        cls = self.scheme_class()
        host = host_for_entry_point(self.entry_point)
        if host.source_schemes.get(cls.name) is not cls:
            names = provided_by(host, self.entry_point, "source_schemes")
            raise ConformanceError(
                f"entry point {self.entry_point!r} does not register {cls.__qualname__} as "
                f"source scheme {cls.name!r} (it registers: {', '.join(names) or 'none'})"
            )

    def test_the_name_is_a_scheme(self) -> None:
        name = self.scheme_class().name
        if not _SCHEME_NAME.match(name or ""):
            raise ConformanceError(
                f"source scheme name {name!r} is not a URI scheme of two or more characters "
                "(lower-case letters, digits, +, ., -; one letter reads as a Windows drive)"
            )

    def test_a_known_reference_resolves_to_an_existing_path(self, tmp_path: Path) -> None:
        if not self.known_references:
            pytest.skip("known_references is empty")
        name = self.scheme_class().name
        resolver = SourceResolver({name: self.scheme_class()})
        for reference in self.known_references:
            steps: list[tuple[str, float]] = []

            def progress(
                phase: str, percent: float, steps: list[tuple[str, float]] = steps
            ) -> None:
                steps.append((phase, percent))

            path = self.make_scheme().resolve(reference, cache_dir=tmp_path, progress=progress)
            if not isinstance(path, Path) or not path.exists():
                raise ConformanceError(
                    f"{name}:{reference} resolved to {path!r}, which is not an existing Path"
                )
            bad = [s for s in steps if not isinstance(s[0], str) or not 0 <= s[1] <= 100]
            if bad:
                raise ConformanceError(f"progress reported {bad[0]}; percent runs 0-100")
            through = resolver(f"{name}:{reference}", tmp_path, lambda phase, percent: None)
            if not through.exists():
                raise ConformanceError(
                    f"the server's resolver got {through} for {name}:{reference}"
                )

    def test_an_unknown_reference_raises_model_load_error_naming_it(self, tmp_path: Path) -> None:
        if not self.unknown_references:
            raise ConformanceError("set unknown_references: references that do not exist")
        name = self.scheme_class().name
        for reference in self.unknown_references:
            try:
                path = self.make_scheme().resolve(
                    reference, cache_dir=tmp_path, progress=lambda phase, percent: None
                )
            except ModelLoadError as exc:
                if reference not in exc.detail:
                    raise ConformanceError(
                        f"{name}:{reference} failed with {exc.detail!r}, which does not name "
                        f"the reference {reference!r}; say which source could not be found"
                    ) from None
                continue
            except Exception as exc:  # noqa: BLE001 - the wrong error is the finding
                raise ConformanceError(
                    f"{name}:{reference} raised {type(exc).__name__}: {exc}; raise "
                    "ModelLoadError, whose message the server shows as the load failure"
                ) from exc
            raise ConformanceError(
                f"{name}:{reference} resolved to {path}; an unknown reference must raise "
                "ModelLoadError"
            )
