"""Run the app under uvicorn with a drain-aware shutdown."""

from __future__ import annotations

import gc
import logging
from types import FrameType

import uvicorn
from litestar import Litestar

from modelyard.core.service import InferenceService
from modelyard.core.settings import ServerSettings

__all__ = ["DrainingServer", "serve"]

log = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness turns 503 at once; uvicorn then lets in-flight requests
    finish for up to ``timeout_graceful_shutdown`` seconds before the lifespan unloads models."""

    def __init__(self, config: uvicorn.Config, service: InferenceService) -> None:
        super().__init__(config)
        self._service = service

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._service.drain():
            log.info("signal %d: draining (ready -> 503), grace %ss", sig,
                     self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)


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
