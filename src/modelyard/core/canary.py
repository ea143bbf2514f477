"""Canary releases: a fixed share of a model's traffic goes to a candidate version."""

from __future__ import annotations

from msgspec import Struct

__all__ = ["Canary", "CanaryView", "OutcomeView"]


class OutcomeView(Struct, frozen=True, kw_only=True):
    """One version's answers while a canary runs."""

    calls: int
    failures: int
    error_rate: float


class CanaryView(Struct, frozen=True, kw_only=True):
    """A running canary: its version, its share, and how each version has answered."""

    target: str
    percent: float
    outcomes: dict[str, OutcomeView]


class _Outcomes:
    __slots__ = ("calls", "failures")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0

    @property
    def error_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0


class Canary:
    """Routes ``percent`` of requests to ``target`` and compares its error rate with the active.

    The split is a deterministic accumulator, not a coin: 10 % means exactly every tenth
    request, so shares are exact at any traffic level and tests need no seeded randomness.
    """

    def __init__(self, target: str, percent: float, *, min_calls: int, error_margin: float) -> None:
        self.target = target
        self.percent = percent
        self.min_calls = min_calls
        self.error_margin = error_margin
        self._acc = 0.0
        self._outcomes: dict[str, _Outcomes] = {}

    def pick(self) -> bool:
        """True when this request goes to the canary."""
        self._acc += self.percent
        if self._acc >= 100.0:
            self._acc -= 100.0
            return True
        return False

    def record(self, version: str, *, failed: bool) -> None:
        outcome = self._outcomes.setdefault(version, _Outcomes())
        outcome.calls += 1
        outcome.failures += failed

    def rollback_reason(self, active: str | None) -> str | None:
        """Why the canary must be rolled back, or None while it holds up."""
        mine = self._outcomes.get(self.target)
        if mine is None or mine.calls < self.min_calls:
            return None
        base = self._outcomes.get(active or "", _Outcomes()).error_rate
        if mine.error_rate - base > self.error_margin:
            return (
                f"canary error rate {mine.error_rate:.0%} exceeds the active's {base:.0%} "
                f"by more than {self.error_margin:.0%}"
            )
        return None

    def snapshot(self) -> CanaryView:
        return CanaryView(
            target=self.target,
            percent=self.percent,
            outcomes={
                v: OutcomeView(calls=o.calls, failures=o.failures,
                               error_rate=round(o.error_rate, 4))
                for v, o in self._outcomes.items()
            },
        )
