"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

Start-up: the socket listens at once; the graphs load in a thread (``/health`` answers 503
``loading`` until every graph is loaded and the slots are allocated). On the first SIGTERM or
SIGINT the server stops accepting requests (503 ``draining``), lets every queued and running
request finish (at most ``--drain-timeout`` seconds), then closes the socket and exits with
status 0. A second signal exits at once.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

from himap_trt.errors import HimapError
from himap_trt.serve.app import ServeConfig, ServerState, create_app

log = logging.getLogger("himap_trt.serve")


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose exit signals first drain the engine."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_deadline is not None or self.state.engine is None:
            # a second signal, or nothing loaded yet: stop now
            self.should_exit = True
            if self.drain_deadline is not None:
                self.force_exit = True
            return
        log.warning("%s: draining (no new requests; waiting for %d in flight)", signal.Signals(sig).name,
                    self._in_flight())
        self.state.status = "draining"
        self.state.engine.drain()
        self.drain_deadline = time.monotonic() + self.state.config.drain_timeout_s

    def _in_flight(self) -> int:
        stats = self.state.engine.stats()
        return stats.waiting + stats.running

    async def on_tick(self, counter: int) -> bool:
        if self.drain_deadline is not None and not self.should_exit:
            if self.state.engine.idle or time.monotonic() > self.drain_deadline:
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until a signal; returns after a drain.

    Raises:
        HimapError: the export cannot be loaded (missing files, wrong backend, ...).
    """
    state = ServerState(config)
    app = create_app(state)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                               timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)))
    server = DrainingServer(uv_config, state)

    def failed() -> None:
        server.should_exit = True

    state.on_failure = failed
    server.run()
    if state.status == "failed":
        raise HimapError(state.error or "loading the model failed")
