"""``Router``: which version answers a request — aliases, canary share, task match."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from modelyard.core.canaries import Canaries
from modelyard.core.errors import ModelNotFoundError, ModelyardError, UnsupportedTaskError
from modelyard.core.failover import Availability, FailoverChain, Target, breaker_availability
from modelyard.core.registry import ModelRegistry, ModelVersion
from modelyard.core.types import Task
from modelyard.core.views import AliasView

if TYPE_CHECKING:
    from modelyard.core.residency import Residency

__all__ = ["Router", "serves"]

_T = TypeVar("_T")


def serves(version: ModelVersion, task: Task) -> bool:
    """A chat model also serves raw completions when its backend can."""
    if version.task == task:
        return True
    return (
        version.task == Task.CHAT
        and task == Task.COMPLETION
        and Task.COMPLETION in version.spec.backend.tasks
    )


class Router:
    """Turns a model name (or alias) and optional version label into the version to call."""

    def __init__(
        self, registry: ModelRegistry, aliases: dict[str, FailoverChain], canaries: Canaries
    ) -> None:
        self._registry = registry
        #: Alias name -> its failover chain of targets.
        self.aliases = aliases
        self._canaries = canaries
        #: Loads on-demand versions before a request is routed to them (set by the service).
        self.residency: Residency | None = None

    def pick(self, model: str, task: Task, version: str | None) -> ModelVersion:
        """The version of ``model`` that serves this request (the canary takes its share)."""
        found = self._registry.get(model, version)
        canary = self._canaries.get(model) if version is None else None
        if canary is not None and canary.pick():
            target = self._registry.entry(model).versions.get(canary.target)
            if (
                target is not None and target.serving
                and not self._canaries.roll_back_if_open(target)
            ):
                found = target
        if not serves(found, task):
            served = found.task.value if found.task else "nothing"
            raise UnsupportedTaskError(f"model {model!r} serves {served}, not {task.value}")
        return found

    async def route(
        self, model: str, version: str | None, task: Task,
        call: Callable[[str, str | None], Awaitable[_T]],
    ) -> _T:
        """``call`` a model directly, or along an alias's failover chain.

        An unloaded on-demand target is loaded first; ``call`` runs right after, with no
        await in between, so the version cannot be evicted before the request holds it.
        """
        chain = self.aliases.get(model)
        if chain is None:
            residency = self.residency
            if residency is not None and model in residency.models:  # no await for the rest
                await residency.ensure(model, version, task)
            return await call(model, version)
        if version is not None:
            raise ModelNotFoundError(f"{model!r} is an alias; it has no version {version!r}")

        async def call_target(target: Target) -> _T:
            await self._load_if_needed(target.model, target.version, task)
            return await call(target.model, target.version)

        answer = await chain.run(call_target, availability=lambda t: self._availability(t, task))
        return answer.value

    async def _load_if_needed(self, model: str, version: str | None, task: Task) -> None:
        residency = self.residency
        if residency is not None and model in residency.models:
            await residency.ensure(model, version, task)

    def _availability(self, target: Target, task: Task) -> Availability:
        loadable = self.residency.target(target.model, target.version) if self.residency else None
        if loadable is not None and not loadable.serving:
            if loadable.task is not None and not serves(loadable, task):
                return Availability.down(f"serves {loadable.task.value}, not {task.value}")
            return Availability(True)  # unloaded on demand: the call loads it
        found = self._registry.get(target.model, target.version)  # 404/503: the chain skips it
        if not serves(found, task):
            served = found.task.value if found.task else "nothing"
            return Availability.down(f"serves {served}, not {task.value}")
        return breaker_availability(found.breaker)

    def resolve(
        self, model: str, version: str | None = None, task: Task | None = None
    ) -> ModelVersion:
        """The version a request for ``model`` (a model or an alias) would reach first now."""
        chain = self.aliases.get(model)
        if chain is None or version is not None:
            if chain is not None:
                raise ModelNotFoundError(f"{model!r} is an alias; it has no version {version!r}")
            return self._registry.get(model, version)
        for target in chain.targets[:-1]:
            if task is None or self._availability(target, task).up:
                try:
                    return self._registry.get(target.model, target.version)
                except ModelyardError:
                    continue
        last = chain.targets[-1]
        return self._registry.get(last.model, last.version)

    def alias_views(self) -> list[AliasView]:
        """Every alias, its failover counters and the breaker state of each target."""
        return [
            AliasView(
                name=chain.name, targets=[str(t) for t in chain.targets],
                failovers=chain.failovers, exhausted=chain.exhausted,
                answered_by=dict(chain.answered_by),
                target_states={str(t): self._target_state(t) for t in chain.targets},
            )
            for chain in self.aliases.values()
        ]

    def _target_state(self, target: Target) -> str:
        try:
            return self._registry.get(target.model, target.version).breaker.state.value
        except ModelyardError as exc:
            return f"unavailable: {exc.detail}"
