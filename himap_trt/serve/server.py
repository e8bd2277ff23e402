"""Running the app under uvicorn, with a graceful drain on SIGTERM / SIGINT.

Start-up: the socket listens at once; the graphs load in a thread (``/health`` answers 503
``loading`` until every graph is loaded and the slots are allocated). On the first SIGTERM or
SIGINT the server stops accepting requests (503 ``draining``), lets every queued and running
request finish (at most ``--drain-timeout`` seconds), then closes the socket and exits with
status 0. A second signal exits at once.

Connections: a client must send a whole request (request line, headers, body) within
``--read-timeout`` seconds of connecting or of its previous answer, else the connection is closed
(slowloris: a request line alone, or half a body, holds nothing for long); an idle kept-alive
connection is closed after ``--keep-alive-timeout`` seconds (uvicorn's ``timeout_keep_alive``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import logging
import signal
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from himap_trt.errors import HimapError
from himap_trt.serve.app import ServeConfig, ServerState, create_app

log = logging.getLogger("himap_trt.serve")

#: glibc's mallopt parameter M_MMAP_THRESHOLD.
_M_MMAP_THRESHOLD = -3


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on reading each request (uvicorn has none: a client that
    sends ``POST / HTTP/1.1\r\n`` and nothing more is otherwise held open for ever)."""

    read_timeout_s = 30.0          # set per server by :func:`timed_protocol`

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._read_deadline = None
        self._arm()

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED, h11.ERROR):
            self._disarm()           # the request is in: the answer may take as long as it takes
        else:
            self._arm()              # a request begun after the previous answer (or still arriving)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._disarm()           # idle now: the keep-alive timeout applies until the next bytes

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.conn.their_state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or self.transport.is_closing():
            return
        prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
        log.warning("%sclosing the connection: no complete request within %g s (--read-timeout)", prefix,
                    self.read_timeout_s)
        self.transport.close()


def timed_protocol(read_timeout_s: float) -> type[TimedH11Protocol]:
    """A :class:`TimedH11Protocol` subclass with this deadline (seconds)."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"read_timeout_s": read_timeout_s})


def return_freed_memory() -> bool:
    """Make glibc return large freed blocks to the system at once: allocations of 1 MiB and more are
    mapped and unmapped on their own (M_MMAP_THRESHOLD fixed at 1 MiB; by default the threshold grows
    up to 32 MiB after the first large free, after which decoded images and preprocessing buffers stay
    in malloc's per-thread arenas). True where set (glibc), False elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, 2**20))
    except (OSError, AttributeError):
        return False


def is_loopback(host: str) -> bool:
    """Whether ``--host`` only listens on this machine (``localhost``, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False     # a host name: it may resolve to any interface


def check_positive(**values: float) -> None:
    """Raises HimapError naming the first flag whose value is not a finite number > 0."""
    for flag, value in values.items():
        if not value > 0 or value == float("inf"):
            raise HimapError(f"{flag} must be a number > 0, got {value}")


def check_exposure(host: str, api_key: str | None, insecure_no_auth: bool, metrics_auth: bool = False) -> None:
    """Refuse to listen beyond loopback without an API key unless told so.

    Raises:
        HimapError: ``host`` is not loopback, no key, and not ``insecure_no_auth``; an empty key;
            ``metrics_auth`` without a key.
    """
    if metrics_auth and api_key is None:
        raise HimapError("--metrics-auth needs --api-key (or HIMAP_TRT_API_KEY): there is no key to ask for")
    if api_key is not None and not api_key.strip():
        raise HimapError("--api-key / HIMAP_TRT_API_KEY is empty; give a key, or leave both unset")
    if not is_loopback(host) and api_key is None and not insecure_no_auth:
        raise HimapError(f"--host {host} listens beyond this machine without authentication: give --api-key KEY "
                         "(or HIMAP_TRT_API_KEY), or --insecure-no-auth to serve anyone who can connect")


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
    return_freed_memory()
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                               http=timed_protocol(config.read_timeout_s), timeout_keep_alive=config.keep_alive_s,
                               timeout_graceful_shutdown=max(1, int(config.drain_timeout_s)))
    server = DrainingServer(uv_config, state)

    def failed() -> None:
        server.should_exit = True

    state.on_failure = failed
    server.run()
    if state.status == "failed":
        raise HimapError(state.error or "loading the model failed")
