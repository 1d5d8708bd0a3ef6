"""The HTTP server's connection-level defences: read deadlines, a connection cap, quiet accept errors.

uvicorn has no deadline for reading a request: a client that opens a connection and sends nothing,
or sends its headers or body a byte at a time, holds a connection and a file descriptor for as long
as it likes, before any authentication can happen. `GuardedH11Protocol` adds the two deadlines of
Apache's mod_reqtimeout (the established answer to slow-loris clients):

* the headers must be complete within `header_seconds` of the connection opening (or, on a kept-alive
  connection, of the next request's first byte);
* the body gets `body_seconds`, plus one more second for every `body_min_rate` bytes received, so a
  large upload on a slow link goes through and a trickle does not. Time while the server itself has
  paused reading (the application is busy with earlier bytes) is not counted against the client.

A request past its deadline is answered 408 (when no response has begun) and its connection closed.

Connections beyond `max_connections` are answered 503 and closed at once, before they hold a
descriptor for long: the cap is set below the process's file descriptor limit, so the journal,
image files and provider connections always find one. When accept() fails anyway (another process
shares the limit), asyncio logs the failure at every attempt, thousands a second; `QuietRepeats`
lets one line through per minute, with the count of the others.

The protocol extends uvicorn's h11 implementation (uvicorn takes a protocol class as its `http`
setting) and relies on its attributes `conn` (the h11 connection), `transport`, `flow` (read
pausing), `cycle` (whether a response began), `connections` and `loop`, as of uvicorn 0.30-0.54; tests/test_hardening_http.py pins the
behaviour over a real socket.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("flux_mcp.http")

FD_RESERVE = 64
"""File descriptors kept free of client connections for the journal, images and provider calls."""
MAX_HEADER_BYTES = 16 * 1024
"""The longest request head (request line and headers) read; h11 answers 400 beyond it."""


def default_max_connections() -> int:
    """A connection cap below this process's file descriptor limit (at most 1000)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # Windows: no such limit to respect
        return 1000
    if soft == resource.RLIM_INFINITY:
        return 1000
    return max(8, min(1000, soft - FD_RESERVE))


@dataclass(frozen=True)
class HttpLimits:
    """Bounds on what one client can hold of the HTTP server before (and after) it authenticates."""

    header_seconds: float = 20.0
    body_seconds: float = 20.0
    body_min_rate: int = 500
    """Bytes a second a body must keep up, past its first `body_seconds`."""
    keep_alive_seconds: float = 5.0
    max_connections: int = field(default_factory=default_max_connections)
    max_sessions: int = 1000
    """Open streamable-HTTP sessions in all (the SDK's default, 10,000, costs ~440 MB when reached)."""
    sessions_per_client: int = 32
    """Open streamable-HTTP sessions per client address (an IDE opens a few)."""
    session_idle_seconds: float = 600.0
    """A streamable-HTTP session with no request in flight this long is closed (the SDK's default: 30 min)."""
    auth_burst: int = 10
    """Failed bearer-token attempts a client address may make at once..."""
    auth_per_second: float = 0.2
    """...and how fast that allowance comes back (one attempt every 5 s)."""


class Occasional:
    """Lets a repeated log line through once per `every` seconds per key, with a count of the others."""

    def __init__(self, every: float = 60.0, clock: Any = time.monotonic):
        self.every = every
        self.clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def due(self, key: str) -> int | None:
        """None while the key is quiet; else how many were held back since its last line."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return None
        if len(self._last) > 4096:
            self._last.clear()
        self._last[key] = (now, 0)
        return last[1] if last else 0


class QuietRepeats(logging.Filter):
    """Lets each known flood-prone log line through once a minute (with the count of the others), as
    one clear line without a traceback: accept() failures, which asyncio logs at every attempt
    (thousands a second once file descriptors run out), and uvicorn's per-request warnings about
    malformed requests, which any client can provoke as fast as it can connect."""

    _LINES: ClassVar[dict[str, str | None]] = {
        "socket.accept() out of system resource": (
            "cannot accept new connections (%s): raise this process's file descriptor limit (ulimit -n) "
            "or lower the number of clients%s"),
        "Invalid HTTP request received.": "refused a malformed HTTP request%s",
        "Unsupported upgrade request.": "refused a protocol upgrade request%s",
        "No supported WebSocket library detected": None,
        "Exceeded concurrency limit.": "refused an HTTP request: too many requests in flight%s",
    }

    def __init__(self) -> None:
        super().__init__()
        self._occasional = Occasional()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        known = next((k for k in self._LINES if message.startswith(k)), None)
        if known is None:
            return True
        held, line = self._occasional.due(known), self._LINES[known]
        if held is None or line is None:
            return False
        more = f"; {held} more in the last minute" if held else ""
        if line.count("%s") == 2:  # accept(): say why
            record.args = (_reason(record), more)
        else:
            record.args = (more,)
        record.msg, record.exc_info, record.exc_text = line, None, None
        return True

    @classmethod
    def install(cls) -> None:
        """Adds the filter to the `asyncio` and `uvicorn.error` loggers (once)."""
        for name in ("asyncio", "uvicorn.error"):
            target = logging.getLogger(name)
            if not any(isinstance(f, cls) for f in target.filters):
                target.addFilter(cls())


def _reason(record: logging.LogRecord) -> str:
    """The OS error's text (the log redactor may have turned the exception into text already)."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.findall(r"\[Errno \d+\] ([^\n]+)", record.exc_text or "")
    return found[-1].strip() if found else "out of system resources"


_WAITING, _HEADERS, _BODY = "waiting", "headers", "body"
_REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: 30\r\n"
            b"connection: close\r\nretry-after: 5\r\n\r\nToo many connections; retry.\r\n")
_TIMED_OUT = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 27\r\n"
              b"connection: close\r\n\r\nThe request came too slowly")
_OCCASIONAL = Occasional()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with request read deadlines and a connection cap (see the module docstring).
    `for_limits` makes the subclass for one server's limits."""

    limits: ClassVar[HttpLimits] = HttpLimits()

    @classmethod
    def for_limits(cls, limits: HttpLimits) -> type[GuardedH11Protocol]:
        return type("GuardedH11Protocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _WAITING
        self._since = 0.0
        self._received = 0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        if len(self.connections) > self.limits.max_connections:
            held = _OCCASIONAL.due("connections")
            if held is not None:
                log.warning("refusing HTTP connections: %d are open, the limit is %d%s", len(self.connections) - 1,
                            self.limits.max_connections, f" ({held} more refused in the last minute)" if held else "")
            self.connections.discard(self)
            self.transport.write(_REFUSED)
            self.transport.close()
            return
        self._enter(_HEADERS)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        phase = self._phase_now()
        if phase != self._phase:
            self._enter(phase)
        self._received += len(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _phase_now(self) -> str:
        if self.transport.is_closing():
            return _WAITING
        their = self.conn.their_state
        if their is h11.IDLE:
            # Between requests uvicorn's keep-alive timeout applies; a request's first byte starts its own.
            return _HEADERS if self.conn.trailing_data[0] or self._phase == _HEADERS else _WAITING
        return _BODY if their is h11.SEND_BODY else _WAITING

    def _enter(self, phase: str) -> None:
        self._cancel()
        self._phase, self._since, self._received = phase, self.loop.time(), 0
        if phase != _WAITING:
            self._timer = self.loop.call_at(self._deadline(), self._check)

    def _deadline(self) -> float:
        if self._phase == _HEADERS:
            return self._since + self.limits.header_seconds
        return self._since + self.limits.body_seconds + self._received / self.limits.body_min_rate

    def _check(self) -> None:
        self._timer = None
        phase = self._phase_now()
        if phase != self._phase:
            self._enter(phase)
            return
        if phase == _WAITING:
            return
        now = self.loop.time()
        if self.flow.read_paused:  # the server is not reading: the client is not late
            self._enter(phase)
            return
        deadline = self._deadline()
        if now < deadline:
            self._timer = self.loop.call_at(deadline, self._check)
            return
        held = _OCCASIONAL.due(f"slow-{phase}")
        if held is not None:
            log.info("closed an HTTP connection from %s: its request %s did not arrive in time%s",
                     self.client[0] if self.client else "?", phase,
                     f" ({held} more in the last minute)" if held else "")
        if phase == _HEADERS or (self.cycle is not None and not self.cycle.response_started):
            self.transport.write(_TIMED_OUT)  # nothing else was written for this request
        self.transport.close()

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def uvicorn_config(app: Any, host: str, port: int, limits: HttpLimits, *, log_level: str = "info") -> Any:
    """The uvicorn configuration that serves `app` within `limits`."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level.lower(), access_log=False, log_config=None,
                          lifespan="on", timeout_graceful_shutdown=5, http=GuardedH11Protocol.for_limits(limits),
                          ws="none", limit_concurrency=limits.max_connections + 1,
                          timeout_keep_alive=int(limits.keep_alive_seconds) or 1,
                          h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                          backlog=min(2048, max(64, limits.max_connections)),
                          server_header=False)
