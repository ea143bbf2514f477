"""``SwapSafety``: whether a version may take over a model's traffic, check by check.

Besides readiness and the backend's own health check, the target must answer a real probe
of its task, serve the active version's task, and keep its signature (tensor names and
types, embedding width): a swap that would fail every request is refused (409).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from modelyard.core.probes import ProbeOutcome, compare_io, run_probe
from modelyard.core.registry import ModelEntry, ModelVersion
from modelyard.core.settings import ServerSettings
from modelyard.core.types import Task
from modelyard.core.views import SafetyCheck, SafetyReport

__all__ = ["SwapSafety"]


class SwapSafety:
    """Builds the safety report a swap, a canary promotion and the admin API show."""

    def __init__(
        self, settings: ServerSettings, timeout_of: Callable[[ModelVersion], float]
    ) -> None:
        self._settings = settings
        self._timeout_of = timeout_of

    async def report(self, entry: ModelEntry, to: str, *, busy: bool) -> SafetyReport:
        """Whether version ``to`` of ``entry`` may become active now, check by check."""
        name = entry.name
        target = entry.versions.get(to)
        checks = [
            SafetyCheck(
                "target_exists", target is not None, "" if target else f"no version {to!r}"
            ),
            SafetyCheck(
                "target_ready",
                bool(target and target.serving),
                target.state.value if target and target.state else "",
            ),
            SafetyCheck("no_concurrent_operation", not busy),
            SafetyCheck("target_not_active", entry.active_version != to),
        ]
        score = 0.0
        if target is not None and target.serving and target.backend is not None:
            report = await target.backend.health()
            score = 1.0 if report.healthy else 0.0
            checks.append(SafetyCheck("target_healthy", report.healthy, report.detail))
        else:
            checks.append(SafetyCheck("target_healthy", False, "not serving"))
        threshold = self._settings.swap_health_threshold
        checks.append(
            SafetyCheck(
                "health_score", score >= threshold, f"{score:.2f} (threshold {threshold:.2f})"
            )
        )
        checks += await self._stand_in_checks(entry, target)
        return SafetyReport(
            model=name,
            to=to,
            from_=entry.active_version,
            safe=all(c.ok for c in checks),
            checks=checks,
        )

    async def _stand_in_checks(
        self, entry: ModelEntry, target: ModelVersion | None
    ) -> list[SafetyCheck]:
        """Can ``target`` answer what the active version answers: task, signature, a probe."""
        names = ("same_task", "same_signature", "probe")
        if target is None or not target.serving:
            reason = "no such version" if target is None else "not serving"
            return [SafetyCheck(n, False, reason) for n in names]
        probed = await self._probe(target)
        probe = SafetyCheck("probe", probed.ok, probed.detail)
        active = entry.active
        if active is None or active is target:
            alone = "no other active version to compare with"
            return [SafetyCheck("same_task", True, alone),
                    SafetyCheck("same_signature", True, alone), probe]
        if active.task is None:
            same_task = SafetyCheck("same_task", True, "the active version's task is unknown")
        else:
            same_task = SafetyCheck(
                "same_task", target.task == active.task,
                f"{active.task.value} -> {target.task.value if target.task else 'unknown'}",
            )
        if not same_task.ok:
            signature = SafetyCheck("same_signature", False, "not compared: the tasks differ")
        else:
            signature = await self._same_signature(active, target, probed)
        return [same_task, signature, probe]

    async def _same_signature(
        self, active: ModelVersion, target: ModelVersion, probed: ProbeOutcome
    ) -> SafetyCheck:
        """Tensor models: the same inputs and outputs; embeddings: the same width."""
        name = "same_signature"
        if not active.serving or active.backend is None or target.backend is None:
            return SafetyCheck(name, True, "not compared: the active version is not serving")
        if target.task == Task.TENSOR:
            problem = compare_io(active.backend.info(), target.backend.info())
            return SafetyCheck(name, not problem, problem or "the same input and output tensors")
        if target.task == Task.EMBEDDINGS:
            if probed.dimensions is None:
                return SafetyCheck(name, False, "not compared: the probe got no vectors")
            theirs = await self._probe(active)
            if theirs.dimensions is None:
                # A broken active version is a reason to swap, not to refuse.
                return SafetyCheck(
                    name, True, f"not compared: the active version's probe failed: {theirs.detail}"
                )
            return SafetyCheck(
                name, theirs.dimensions == probed.dimensions,
                f"{theirs.dimensions} -> {probed.dimensions} dimensions",
            )
        task = target.task.value if target.task else "unknown"
        return SafetyCheck(name, True, f"nothing to compare for {task}")

    async def _probe(self, version: ModelVersion) -> ProbeOutcome:
        outcome = await run_probe(version, timeout_s=self._timeout_of(version))
        version.record_health(outcome.ok, outcome.detail, time.time())
        return outcome
