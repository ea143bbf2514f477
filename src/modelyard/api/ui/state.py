"""``ConsoleState``: what the console's handlers are given (the ``console`` dependency)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from litestar.params import Dependency

from modelyard.api.ui.assets import Assets
from modelyard.api.ui.journal import Journal
from modelyard.api.ui.keys import KeyAdmin
from modelyard.api.ui.traffic import TrafficWindow
from modelyard.core.service import InferenceService

__all__ = ["ConsoleDep", "ConsoleState"]


@dataclass(frozen=True)
class ConsoleState:
    """One app's console: templates and static files, traffic, incidents and key admin."""

    assets: Assets
    traffic: TrafficWindow
    journal: Journal
    keys: KeyAdmin
    service: InferenceService

    def read(self) -> None:
        """Take a traffic reading and let the journal compare the models' views with the last."""
        self.traffic.sample()
        self.journal.observe(self.service.model_views(), self.traffic.last_wall)

    def read_if_due(self) -> None:
        """A reading now unless the sampler took one less than ``interval_s`` ago (apps
        served without their lifespan, such as ASGI test clients, have no sampler)."""
        if self.traffic.due():
            self.read()


#: A handler parameter for the app's console (the ``console`` dependency).
ConsoleDep = Annotated[ConsoleState, Dependency(skip_validation=True)]
