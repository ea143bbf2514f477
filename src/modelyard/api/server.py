"""Run the app under uvicorn with a drain-aware shutdown."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from types import FrameType

import uvicorn
from litestar import Litestar

from modelyard.api.exchange import Exchange
from modelyard.core.service import InferenceService
from modelyard.core.settings import ServerSettings

__all__ = ["DrainingServer", "serve"]

log = logging.getLogger(__name__)

#: How often the drain looks whether the last request has finished.
_POLL_S = 0.05
#: How long requests cut off at the end of the grace period get to send their 503.
_ABORT_WAIT_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain: on SIGTERM/SIGINT readiness turns 503 at once, the listening
    sockets close, and in-flight requests get ``timeout_graceful_shutdown`` seconds to finish.

    Unlike uvicorn's own shutdown, connections still open stay open while requests are in
    flight, so a load balancer's probe on a kept-alive connection reads 503 from
    ``/v2/health/ready`` instead of a reset; every response of the drain closes its
    connection. When the grace period is over, what still runs is answered 503 problem+json
    with ``Retry-After`` by the exchange layer (never uvicorn's bare 500 and a traceback), and
    only then does the lifespan unload the models.
    """

    def __init__(
        self, config: uvicorn.Config, service: InferenceService, exchange: Exchange | None = None
    ) -> None:
        super().__init__(config)
        self._service = service
        # create_app installs the exchange layer as the app's ASGI handler.
        found = getattr(config.app, "asgi_handler", None)
        self._exchange = exchange if exchange is not None else (
            found if isinstance(found, Exchange) else None
        )

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._service.drain():
            log.info("signal %d: draining (ready -> 503), grace %ss", sig,
                     self.config.timeout_graceful_shutdown)
        if self._exchange is not None:
            self._exchange.begin_drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        exchange = self._exchange
        if exchange is None:  # not our app: uvicorn's own drain
            await super().shutdown(sockets)
            return
        log.info("shutting down: no new connections, %d request(s) in flight",
                 exchange.in_flight)
        exchange.begin_drain()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await self._wait_for_requests(exchange)
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        await self._wait_for_connections()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _wait_for_requests(self, exchange: Exchange) -> None:
        """Until no request is in flight, or the grace period ends and the rest get 503."""
        grace = self.config.timeout_graceful_shutdown
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        while exchange.in_flight and not self.force_exit:
            if deadline is not None and loop.time() >= deadline:
                aborted = exchange.abort_in_flight()
                log.warning("grace period of %ss over: %d request(s) still in flight "
                            "answered 503", grace, aborted)
                return
            await asyncio.sleep(_POLL_S)

    async def _wait_for_connections(self) -> None:
        state = self.server_state
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ABORT_WAIT_S
        while (state.connections or state.tasks) and not self.force_exit:
            if loop.time() >= deadline:
                # Something ignored its cancellation: uvicorn's last resort.
                log.error("cancelling %d request task(s) that outlived the drain",
                          len(state.tasks))
                for task in state.tasks:
                    task.cancel(msg="the drain's grace period is over")
                break
            await asyncio.sleep(_POLL_S)
        for server in self.servers:
            await server.wait_closed()


def serve(app: Litestar, service: InferenceService, server: ServerSettings) -> None:
    limits = service.settings.limits
    config = uvicorn.Config(
        app, host=server.host, port=server.port, log_level=server.log_level,
        # Slow clients (docs/security.md): idle keep-alive connections close, header bytes
        # are bounded, connections past the limit get 503; stalled bodies get 408 in the app.
        # httptools by default for speed; h11 bounds header bytes (docs/security.md).
        http=limits.http_parser,
        timeout_keep_alive=limits.keep_alive_timeout_s,
        h11_max_incomplete_event_size=limits.max_header_bytes,
        limit_concurrency=limits.max_connections,
        timeout_graceful_shutdown=max(1, round(server.shutdown_grace_s)), access_log=False,
        lifespan="on", log_config=None,  # uvicorn's lines go through our (JSON) root handler
    )
    tune_gc()
    DrainingServer(config, service).run()


def tune_gc() -> None:
    """Collect less often, and never again walk what startup built.

    A request allocates a few hundred short-lived objects; at Python's default threshold (700)
    the collector runs every few requests and, every tenth time, walks the older generation
    holding everything imported at startup. ``gc.freeze`` moves those objects out of the
    collector's view and a larger first threshold batches the young collections, which lowers
    the server's CPU per request (measure with bench/onnx_embeddings.py). Cycles are still
    collected; memory held by young garbage stays bounded by the threshold.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 100)
