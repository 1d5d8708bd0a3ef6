"""Stopping gracefully: a paid job the provider accepted is journaled before the process exits.

How a server is stopped, and what each way leaves time for:

* The MCP Python client closes the server's stdin, waits two seconds, sends SIGTERM to the server's
  process group, waits two more seconds, then sends SIGKILL. Other clients and service managers send
  SIGTERM (and SIGKILL after their own grace period); a person at a terminal presses Ctrl-C (SIGINT).
* Every one of these starts the same stop: new tool calls are refused with a tool error that says so,
  the paid submits in flight are awaited with their journal writes (at most `STOP_TIMEOUT` seconds,
  logged), then the transport stops serving, the journal is closed, pending fsyncs are flushed and
  temp files are removed, and the process exits with status 0 and no traceback.
* Over HTTP the server stops accepting connections at the signal itself (a load balancer's next
  connection attempt goes to another replica) and closes kept-alive connections once their answer is
  sent; the calls in flight are answered for up to uvicorn's graceful-shutdown timeout, then cut.
* A later SIGTERM does not cut the wait short (the MCP client sends one two seconds after closing
  stdin, while the wait is the whole point); a second Ctrl-C does.

A held submit (a synchronous mode that answers only when the job is done) is the case this exists
for: its answer carries the job's id, and an id that never reaches the journal is a job the user may
pay for and can never look up.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import anyio

from .errors import FluxError

log = logging.getLogger("flux_mcp.lifecycle")

END_OF_INPUT = "stdin closed"
"""The reason of a stop that the client began by closing the server's stdin."""
STOP_TIMEOUT = 60.0
"""The longest a stop waits for paid submits to be answered (a held sync-mode submit can take a while)."""


class ServerStopping(FluxError):
    """The server is stopping: it takes no new calls (the client should restart it or try again later)."""


class SubmitAbandoned(FluxError):
    """The server stopped before the provider answered a paid submit (the job may exist, unjournaled)."""


@dataclass(eq=False)
class _Submit:
    what: str
    started: float
    scope: anyio.CancelScope


class Inflight:
    """The paid submits in flight in this process, and whether it is stopping.

    `with inflight.submitting(...)` goes around a paid submit and the journal write of its answer: it
    refuses to start once the process is stopping, and shields its block from the caller's
    cancellation (a client that gives up must not lose the job's id) but not from the stop's deadline.
    """

    def __init__(self) -> None:
        self.stopping = False
        """Set when a stop begins; from then on no tool call is started (unless `admitting`)."""
        self.admitting = False
        """Set while a stopping transport still answers the calls it received before it stopped accepting
        connections (HTTP: they arrived before the signal; refusing them would only make their clients retry)."""
        self._submits: set[_Submit] = set()
        self._idle: anyio.Event | None = None

    @property
    def count(self) -> int:
        return len(self._submits)

    def refuse_new(self) -> None:
        """Raises ServerStopping once a stop has begun (and the calls already received are no longer admitted)."""
        if self.stopping and not self.admitting:
            raise ServerStopping("The flux-mcp server is shutting down and takes no new calls. Nothing was sent "
                                 "to any provider; call again once the client has restarted the server.")

    @contextmanager
    def submitting(self, what: str = "a paid submit") -> Iterator[None]:
        """Marks a paid submit (and the journal write of its answer) as in flight; `what` names it in logs."""
        self.refuse_new()
        entry = _Submit(what, time.monotonic(), anyio.CancelScope(shield=True))
        self._submits.add(entry)
        try:
            with entry.scope:
                yield
        finally:
            self._submits.discard(entry)
            if not self._submits and self._idle is not None:
                self._idle.set()
        if entry.scope.cancelled_caught:
            raise SubmitAbandoned(
                f"The server stopped before the provider answered {what}. The job may have been created (and "
                "charged) without its id reaching this server: check the provider's dashboard or history before "
                "asking again.")

    async def drain(self, timeout: float) -> bool:
        """Waits until no submit is in flight (True), or `timeout` seconds pass (False)."""
        try:
            with anyio.move_on_after(timeout):
                while self._submits:
                    self._idle = anyio.Event()
                    await self._idle.wait()
        finally:
            self._idle = None
        return not self._submits

    def describe(self) -> str:
        now = time.monotonic()
        return ", ".join(f"{s.what} (sent {now - s.started:.0f} s ago)"
                         for s in sorted(self._submits, key=lambda s: s.started))

    def abandon(self) -> None:
        """Stops waiting for the submits still in flight (each raises SubmitAbandoned in its call)."""
        for entry in list(self._submits):
            entry.scope.cancel()


inflight = Inflight()
"""This process's registry: the tools check it, the transports' stop drains it."""


class GracefulStop:
    """One stop of a serving process; `request()` starts it (from a signal handler or at end of input)."""

    def __init__(self, registry: Inflight, timeout: float, stop_serving: Callable[[bool], None] | None = None,
                 stop_accepting: Callable[[], None] | None = None):
        self.registry = registry
        self._stop_accepting = stop_accepting
        """Called when a signal starts the stop: the transport takes no new connection from then on."""
        self.timeout = timeout
        self.reason: str | None = None
        self.serving = anyio.CancelScope()
        """Cancelled when the stop is ready for serving to end, unless the caller stops serving its own way."""
        self._stop_serving = stop_serving or self._cancel_serving
        self._requested = anyio.Event()
        self._hurry = anyio.Event()

    def _cancel_serving(self, hurried: bool) -> None:
        if self.reason != END_OF_INPUT:  # at the end of input, serving ends once every request read is answered
            self.serving.cancel()

    def request(self, reason: str) -> None:
        """Starts the stop (once); a later Ctrl-C skips what is left of the wait."""
        if self.reason is None:
            self.reason = reason
            # At the end of input no call can arrive any more, and every one already read is answered (a
            # client that sends its calls and closes stdin at once gets its answers); a signal refuses new ones.
            self.registry.stopping = reason != END_OF_INPUT
            self._requested.set()
            if self._stop_accepting is not None and reason != END_OF_INPUT:
                self.registry.admitting = True  # what got in before the signal is answered (the server's
                # lifespan awaits any paid submit still in flight before it closes the journal)
                self._stop_accepting()
        elif reason == "SIGINT" and self.reason == "SIGINT":
            log.warning("second Ctrl-C: stopping without waiting for the provider's answer")
            self._hurry.set()
        elif self.registry.count:
            log.info("%s received; still waiting for %s", reason, self.registry.describe())

    async def run(self) -> None:
        await self._requested.wait()
        count = self.registry.count
        if count:
            log.info("stopping (%s): waiting up to %.0f s for %s to be answered and journaled", self.reason,
                     self.timeout, self.registry.describe())
        else:
            log.info("stopping (%s)", self.reason)
        drained = True
        if count:
            async with anyio.create_task_group() as tg:

                async def drain() -> None:
                    nonlocal drained
                    drained = await self.registry.drain(self.timeout)
                    tg.cancel_scope.cancel()

                async def hurry() -> None:
                    nonlocal drained
                    await self._hurry.wait()
                    drained = False
                    tg.cancel_scope.cancel()

                tg.start_soon(drain)
                tg.start_soon(hurry)
        if not drained:
            log.warning("stopping with %s still unanswered: the job may exist (and be charged) at the provider "
                        "with no record here", self.registry.describe())
            self.registry.abandon()
        elif count:
            log.info("the paid submits in flight have ended: every job a provider accepted is journaled")
        self._stop_serving(self._hurry.is_set())

    def finish(self) -> None:
        """The last step of every stop: the images written are flushed to stable storage, the temp files of
        writes still under way are removed (a process that never imported the writing code wrote nothing)."""
        files = sys.modules.get(f"{__package__}.files")
        if files is not None:
            if not files.flush_pending(timeout=10.0):
                log.warning("the disk did not confirm the last images written within 10 s")
            removed = files.remove_temp_files()
            if removed:
                log.info("removed %d unfinished temp file(s)", removed)
        if self.reason is not None:
            log.info("stopped")

    async def watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                self.request(signal.Signals(signum).name)


@asynccontextmanager
async def graceful_stop(stop_serving: Callable[[bool], None] | None = None, *, registry: Inflight | None = None,
                        timeout: float = STOP_TIMEOUT, signals: bool = True,
                        stop_accepting: Callable[[], None] | None = None) -> AsyncIterator[GracefulStop]:
    """Runs a stop for the serving code inside: SIGTERM and SIGINT (or the caller's `request()`) start it;
    once the submits in flight are answered (or abandoned), `stop_serving(hurried)` is called (by default:
    the stop's `serving` scope is cancelled), and the serving code inside should then end. On the way out
    the temp files of writes still under way are removed."""
    stop = GracefulStop(registry or inflight, timeout, stop_serving, stop_accepting)
    try:
        async with anyio.create_task_group() as tg:
            if signals and sys.platform != "win32":  # there, Ctrl-C stays KeyboardInterrupt (the CLI catches it)
                tg.start_soon(stop.watch_signals)
            tg.start_soon(stop.run)
            try:
                yield stop
            finally:
                tg.cancel_scope.cancel()
    finally:
        stop.finish()
