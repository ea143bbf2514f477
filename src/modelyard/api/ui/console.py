"""``Console``: mounts the web console at ``/ui`` and runs what it watches in the background.

``create_app`` adds one ``Console(settings.ui, service, security)`` to the app's plugins; with
``[ui] enabled = false`` it adds nothing. Otherwise it mounts the pages, the static files and
the console's JSON routes (``/ui/api``), provides its state as the ``console`` dependency, and
adds a lifespan step that reads the metrics every ``interval_s`` (for requests per second,
p50/p99 and the charts) and notes recent incidents (failed loads, breakers, canaries).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from litestar import Litestar
from litestar.config.app import AppConfig
from litestar.di import Provide

from modelyard.api.security import Security
from modelyard.api.ui.api import ConsoleApiController
from modelyard.api.ui.assets import Assets
from modelyard.api.ui.journal import Journal
from modelyard.api.ui.keys import KeyAdmin
from modelyard.api.ui.pages import PagesController, static_file
from modelyard.api.ui.state import ConsoleState
from modelyard.api.ui.traffic import TrafficWindow
from modelyard.core.service import InferenceService
from modelyard.core.ui_settings import UiSettings

__all__ = ["Console"]


class Console:
    """The console of one app: a Litestar init plugin (``InitPluginProtocol``, by shape, so it
    works from Litestar 2.0 on)."""

    def __init__(
        self,
        settings: UiSettings,
        service: InferenceService,
        security: Security,
        *,
        interval_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.enabled = settings.enabled
        self._service = service
        self._security = security
        self._interval_s = interval_s
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self.state: ConsoleState | None = None

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        if not self.enabled:
            return app_config
        state = self.state = ConsoleState(
            assets=Assets(),
            traffic=TrafficWindow(self._service.telemetry.metrics, interval_s=self._interval_s,
                                  clock=self._clock, wall=self._wall),
            journal=Journal(),
            keys=KeyAdmin(self._security, wall=self._wall),
            service=self._service,
        )
        app_config.route_handlers.extend([PagesController, static_file, ConsoleApiController])
        app_config.dependencies["console"] = Provide(lambda: state, sync_to_thread=False)
        app_config.lifespan.append(self.lifespan)
        return app_config

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Litestar) -> AsyncIterator[None]:
        """Read the metrics and the models' views every ``interval_s`` while the app runs."""
        state = self.state
        assert state is not None
        sampler = asyncio.get_running_loop().create_task(self._sample(state))
        try:
            yield
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)

    async def _sample(self, state: ConsoleState) -> None:
        while True:
            state.read()
            await self._sleep(state.traffic.interval_s)
