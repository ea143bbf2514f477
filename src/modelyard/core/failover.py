"""Aliases with an ordered chain of targets: skip the ones that are down, fail over mid-request.

A request for an alias tries its targets in order. A target that is down (breaker open, not
serving, failed, unhealthy: whatever the ``availability`` callable says) is skipped without a
call; a target that fails during the call (5xx, backend error, timeout) hands the same request
to the next one, so each target is tried at most once. A client error (4xx) is the client's on
any target and is raised at once. The last target is never ejected: once reached it is always
called, and its own guard (breaker, registry) still refuses fast. When no target answers, the
caller gets 503 with the smallest Retry-After among the targets, never a 500.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

from modelyard.core.breaker import CircuitBreaker, counts_as_failure
from modelyard.core.errors import ConfigError, ModelyardError, ServiceUnavailableError

__all__ = [
    "AliasLike",
    "Answer",
    "Attempt",
    "Availability",
    "FailoverChain",
    "Target",
    "breaker_availability",
    "build_chains",
    "parse_target",
]

T = TypeVar("T")
log = logging.getLogger(__name__)

#: Retry-After assumed for a target that failed mid-call or said nothing more precise.
DEFAULT_RETRY_AFTER_S = 1.0


@dataclass(frozen=True, slots=True)
class Target:
    """A model (its active version) or one pinned version of it."""

    model: str
    version: str | None = None

    def __str__(self) -> str:
        return self.model if self.version is None else f"{self.model}:{self.version}"


class Availability(NamedTuple):
    """What the service knows about a target before calling it."""

    up: bool
    reason: str = ""
    retry_after: float = DEFAULT_RETRY_AFTER_S

    @classmethod
    def down(cls, reason: str, retry_after: float = DEFAULT_RETRY_AFTER_S) -> Availability:
        return cls(False, reason, retry_after)


UP = Availability(True)

AvailabilityCheck = Callable[[Target], Availability | Awaitable[Availability]]


def breaker_availability(breaker: CircuitBreaker) -> Availability:
    """Down while the breaker would refuse, with its remaining open time."""
    if breaker.allow():
        return UP
    return Availability.down(
        f"circuit breaker {breaker.state.value}", max(breaker.retry_after, DEFAULT_RETRY_AFTER_S)
    )


@dataclass(frozen=True, slots=True)
class Attempt:
    """A target the request passed over, and why."""

    target: Target
    #: skipped: not called (down); refused: called, answered 503; failed: called, broke.
    outcome: Literal["skipped", "refused", "failed"]
    reason: str
    retry_after: float

    def describe(self) -> dict[str, Any]:
        return {"target": str(self.target), "outcome": self.outcome, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """The value, the target that produced it, and the targets passed over on the way."""

    target: Target
    value: T
    attempts: tuple[Attempt, ...] = ()

    @property
    def failed_over(self) -> bool:
        return bool(self.attempts)


class FailoverChain:
    """The ordered targets of one alias and the loop that walks them for a request."""

    def __init__(
        self,
        name: str,
        targets: Sequence[Target],
        *,
        availability: AvailabilityCheck | None = None,
    ) -> None:
        if not targets:
            raise ValueError(f"alias {name!r} needs at least one target")
        self.name = name
        self.targets = tuple(targets)
        self.availability = availability
        #: Times a request moved from one target to the next (skipped, refused or failed).
        self.failovers = 0
        #: Requests that no target answered (503).
        self.exhausted = 0
        #: Which target answered, by ``str(target)``.
        self.answered_by: collections.Counter[str] = collections.Counter()

    async def run(
        self,
        call: Callable[[Target], Awaitable[T]],
        *,
        availability: AvailabilityCheck | None = None,
    ) -> Answer[T]:
        """Answer with the first target that can; 4xx at once; 503 when none can.

        ``availability`` replaces the chain's own check for this request (say, one that also
        skips targets that do not serve the request's task).
        """
        check = availability or self.availability
        attempts: list[Attempt] = []
        last = len(self.targets) - 1
        for i, target in enumerate(self.targets):
            if i > 0:
                self.failovers += 1
            if i < last:
                status = await _check(check, target)
                if not status.up:
                    attempts.append(Attempt(target, "skipped", status.reason, status.retry_after))
                    continue
            try:
                value = await call(target)
            except Exception as exc:
                if counts_as_failure(exc) is None:
                    raise  # a 4xx would be the same on every target
                attempts.append(self._passed_over(target, exc, is_last=i == last))
                continue
            self.answered_by[str(target)] += 1
            return Answer(target, value, tuple(attempts))
        self.exhausted += 1
        raise self._all_down(attempts)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready view for admin endpoints."""
        return {
            "name": self.name,
            "targets": [str(t) for t in self.targets],
            "failovers": self.failovers,
            "exhausted": self.exhausted,
            "answered_by": dict(self.answered_by),
        }

    def _passed_over(self, target: Target, exc: Exception, *, is_last: bool) -> Attempt:
        if isinstance(exc, ServiceUnavailableError):
            return Attempt(target, "refused", exc.detail, _retry_after_of(exc))
        reason = exc.detail if isinstance(exc, ModelyardError) else f"{type(exc).__name__}: {exc}"
        log.warning(
            "alias %s: target %s failed (%s)%s", self.name, target, reason,
            "" if is_last else "; trying the next target",
        )
        return Attempt(target, "failed", reason, DEFAULT_RETRY_AFTER_S)

    def _all_down(self, attempts: list[Attempt]) -> ServiceUnavailableError:
        retry_after = min(a.retry_after for a in attempts)
        listed = "; ".join(f"{a.target}: {a.reason}" for a in attempts)
        return ServiceUnavailableError(
            f"no target of {self.name!r} can answer now ({listed})",
            retry_after=math.ceil(retry_after),
            extra={"alias": self.name, "attempts": [a.describe() for a in attempts]},
        )


async def _check(check: AvailabilityCheck | None, target: Target) -> Availability:
    if check is None:
        return UP
    try:
        status = check(target)
        if inspect.isawaitable(status):
            status = await status
    except ModelyardError as exc:  # e.g. the target's model was removed
        return Availability.down(exc.detail, _retry_after_of(exc))
    return status


def _retry_after_of(exc: ModelyardError) -> float:
    try:
        return float(exc.headers["Retry-After"])
    except (KeyError, ValueError):
        return DEFAULT_RETRY_AFTER_S


# -- configuration -----------------------------------------------------------------------------


class AliasLike(Protocol):
    """An ``[[aliases]]`` entry: ``name`` and its ordered ``targets``."""

    @property
    def name(self) -> str: ...

    @property
    def targets(self) -> Sequence[str]: ...


def parse_target(text: str, versions: Mapping[str, Collection[str]]) -> Target | None:
    """``model`` or ``model:version`` against the configured versions; None if neither exists.

    Model names may contain ``:`` and version labels may not, so an exact model name wins and
    otherwise the text splits at its last ``:``.
    """
    if text in versions:
        return Target(text)
    model, sep, version = text.rpartition(":")
    if sep and version in versions.get(model, ()):
        return Target(model, version)
    return None


def build_chains(
    aliases: Sequence[AliasLike],
    versions: Mapping[str, Collection[str]],
    *,
    availability: AvailabilityCheck | None = None,
    where: str = "$.aliases",
) -> dict[str, FailoverChain]:
    """Check every alias against the configured models; errors name the offending path."""
    chains: dict[str, FailoverChain] = {}
    for i, alias in enumerate(aliases):
        at = f"{where}[{i}]"
        if alias.name in versions:
            raise ConfigError(f"{at}.name: {alias.name!r} is already a model name")
        if alias.name in chains:
            raise ConfigError(f"{at}.name: alias {alias.name!r} is defined twice")
        if not alias.targets:
            raise ConfigError(f"{at}.targets: an alias needs at least one target")
        targets: list[Target] = []
        for j, text in enumerate(alias.targets):
            target = parse_target(text, versions)
            if target is None:
                hint = " (aliases cannot point at aliases)" if _is_alias(text, aliases) else ""
                raise ConfigError(f"{at}.targets[{j}]: no model or model:version {text!r}{hint}")
            if target in targets:
                raise ConfigError(f"{at}.targets[{j}]: {text!r} is listed twice")
            targets.append(target)
        chains[alias.name] = FailoverChain(alias.name, targets, availability=availability)
    return chains


def _is_alias(text: str, aliases: Sequence[AliasLike]) -> bool:
    return any(a.name == text for a in aliases)
