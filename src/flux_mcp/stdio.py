"""MCP over stdio for clients of every protocol era, including those that probe first.

The SDK's dual-era loop fixes a connection's era from the client's first request, once. Clients in
the field (Claude Code 2.1.280, Copilot CLI 1.0.85; anthropics/claude-code#96183) open with a
2026-07-28 `server/discover` probe and then send the legacy `initialize` handshake on the same
connection, which that rule refuses with -32022. Here a `server/discover` that arrives before the
era is decided is answered on its own, statelessly, and does not decide it: the first other request
does (`initialize` opens the handshake era, a request carrying the 2026-07-28 `_meta` envelope the
modern one), exactly as the SDK would have without the probe.

A line that is not a JSON-RPC message gets JSON-RPC 2.0's answer (-32700 or -32600, id null) instead
of silence, so a client waiting on it learns why. A line whose only fault is a lone surrogate escape
(a JavaScript client that cut a string inside an emoji) is read with U+FFFD in its place, so its
request is answered (see `surrogates`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self

import anyio
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.connection import Connection
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.server.runner import modern_error_data, serve_dual_era_loop, serve_one
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError, NoBackChannelError
from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request
from mcp.shared.message import SessionMessage
from mcp.shared.transport_context import TransportContext
from mcp_types import (
    INVALID_REQUEST,
    PARSE_ERROR,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
    jsonrpc_message_adapter,
)
from pydantic import ValidationError

from .compat import lowlevel, message_streams
from .lifecycle import END_OF_INPUT, STOP_TIMEOUT, GracefulStop, graceful_stop
from .surrogates import repair_surrogates

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from types import TracebackType

    from mcp.shared.message import MessageMetadata
    from mcp_types import RequestId

    from .compat import ReadStream, WriteStream

log = logging.getLogger("flux_mcp.stdio")

DISCOVER = "server/discover"
Inbound = SessionMessage | Exception
"""What the stdio reader yields: a message, or the error of a line that is none."""


def run_stdio(server: MCPServer[Any]) -> None:
    """Serves `server` over this process's stdin/stdout until the client closes stdin, or SIGTERM or
    SIGINT arrives; either way the stop is graceful (see `flux_mcp.lifecycle`)."""
    anyio.run(serve_stdio, server)


async def serve_stdio(server: MCPServer[Any]) -> None:
    async with graceful_stop() as stop:
        async with pipe_streams() as streams:
            if streams is not None:
                await serve_streams(lowlevel(server), *streams, stop=stop)
                return
        async with stdio_server() as (read_stream, write_stream):  # stdin/stdout are not pipes (or not POSIX)
            await serve_streams(lowlevel(server), read_stream, write_stream, stop=stop)
            if stop.reason is not None and stop.reason != END_OF_INPUT:
                # Stopped by a signal while the SDK's reader thread waits on stdin (a terminal: Ctrl-C), which
                # nothing can interrupt. The journal is closed and the images flushed: nothing is left to do.
                stop.finish()
                os._exit(0)


_FLUSH_SECONDS = 10.0
MAX_LINE = 64 * 1024 * 1024
"""The longest JSON-RPC line read (edit_image takes data: URIs up to 20 MB); longer ones get -32600."""


@asynccontextmanager
async def pipe_streams() -> AsyncIterator[tuple[ReadStream[Inbound], WriteStream[SessionMessage]] | None]:
    """The MCP message streams over this process's stdin/stdout, read and written by the event loop
    itself (the SDK's stdio transport hands every line read, written and flushed to a worker thread).

    As in the SDK, fd 0 and fd 1 are diverted while serving (to the null device and to stderr), so
    stray reads see EOF and stray prints cannot corrupt the wire; the wire is served from private
    duplicates and restored on exit. Yields None where stdin or stdout is not a pipe or socket (a
    terminal, a regular file), or on Windows: the caller then uses the SDK's transport.
    """
    if sys.platform == "win32" or not all(_pipe_like(fd) for fd in (0, 1)):
        yield None
        return
    loop = asyncio.get_running_loop()
    wire_in, wire_out = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3), fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    reader = asyncio.StreamReader(limit=MAX_LINE)
    read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                     os.fdopen(wire_in, "rb", buffering=0))
    write_transport, write_protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), os.fdopen(wire_out, "wb", buffering=0))
    writer = asyncio.StreamWriter(write_transport, write_protocol, None, loop)
    inbound_send, inbound = message_streams[Inbound](0)
    outbound, outbound_receive = message_streams[SessionMessage](0)

    async def read_lines() -> None:
        async with inbound_send:
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as end:
                    line = end.partial  # the last line may lack its newline; b"" is the end of input
                    if not line.strip():
                        return
                except asyncio.LimitOverrunError as exc:
                    await reader.readexactly(exc.consumed)  # drop the overlong line up to where it was seen
                    await _skip_line(reader)
                    await inbound_send.send(ValueError(f"line over {MAX_LINE} bytes"))
                    continue
                if not line.strip():
                    continue
                try:
                    message = jsonrpc_message_adapter.validate_json(line, by_name=False)
                except Exception as exc:  # noqa: BLE001 - answered with -32700/-32600 by the relay
                    await inbound_send.send(exc)
                    continue
                await inbound_send.send(SessionMessage(message))

    written = anyio.Event()

    async def write_lines() -> None:
        try:
            async with outbound_receive:
                async for item in outbound_receive:
                    data = item.message.model_dump_json(by_alias=True, exclude_unset=True)
                    try:
                        writer.write(data.encode() + b"\n")
                        await writer.drain()
                    except ConnectionError:
                        log.debug("stdout closed by the client; nothing more is written")
                        return
        finally:
            written.set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read_lines)
            tg.start_soon(write_lines)
            yield inbound, outbound
            # The server loop closes `outbound` when it is done: every answer is written before the end.
            with anyio.move_on_after(_FLUSH_SECONDS):
                await written.wait()
            tg.cancel_scope.cancel()
    finally:
        for fd, wire in ((0, wire_in), (1, wire_out)):
            with contextlib.suppress(OSError):
                os.dup2(wire, fd)  # the wire back on the standard descriptor...
                os.set_blocking(fd, True)  # ...as the client gave it (the loop made it non-blocking)
        read_transport.close()
        write_transport.close()


async def _skip_line(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)
        except asyncio.IncompleteReadError:
            return


def _pipe_like(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    # Not terminals: the loop makes the descriptor non-blocking, and a terminal's is shared with the shell.
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


async def serve_streams(server: Server[Any], read_stream: ReadStream[Inbound],
                        write_stream: WriteStream[SessionMessage], *, stop: GracefulStop | None = None) -> None:
    """One client connection over a duplex stream pair: early discovery probes answered here, the rest
    served by the SDK's dual-era loop (which owns and closes `write_stream`).

    With `stop`, the end of input starts that graceful stop, and its `serving` scope ends the connection
    (the lifespan, which closes the journal, is outside that scope and always runs to its end)."""
    async with server.lifespan(server) as state:
        relay_send, relay_receive = anyio.create_memory_object_stream[Inbound](0)
        answers = _Answers(write_stream)
        with stop.serving if stop is not None else contextlib.nullcontext():
            async with anyio.create_task_group() as tg:
                tg.start_soon(_answer_probes_then_relay, server, state, read_stream, answers, relay_send,
                              stop)
                await serve_dual_era_loop(server, relay_receive, answers, lifespan_state=state,
                                          init_options=server.create_initialization_options())
                tg.cancel_scope.cancel()


class _Answers:
    """The connection's write stream, keeping count of the requests relayed to the SDK's loop that are not
    answered yet: at the end of input the loop ends (and cancels what is still running) once its input
    closes, so the relay holds the input open until every request read has had its answer."""

    def __init__(self, inner: WriteStream[SessionMessage]):
        self._inner = inner
        self._open: set[RequestId] = set()
        self._idle = anyio.Event()
        self._idle.set()

    def expect(self, item: Inbound) -> None:
        """Notes a request read (a cancelled request gets no answer: its cancellation closes it)."""
        message = item.message if isinstance(item, SessionMessage) else None
        if isinstance(message, JSONRPCRequest):
            self._open.add(message.id)
            if self._idle.is_set():
                self._idle = anyio.Event()
        elif isinstance(message, JSONRPCNotification) and message.method == "notifications/cancelled":
            self._answered((message.params or {}).get("requestId"))

    async def all_answered(self) -> None:
        """Waits until every request read has been answered (at most the stop's own deadline)."""
        with anyio.move_on_after(STOP_TIMEOUT):
            await self._idle.wait()
        if self._open:
            log.warning("input ended with %d request(s) still unanswered after %.0f s", len(self._open),
                        STOP_TIMEOUT)

    def _answered(self, request_id: Any) -> None:
        if request_id in self._open:
            self._open.discard(request_id)
            if not self._open:
                self._idle.set()

    async def send(self, item: SessionMessage, /) -> None:
        await self._inner.send(item)
        message = item.message
        if isinstance(message, (JSONRPCResponse, JSONRPCError)):
            self._answered(message.id)

    async def aclose(self) -> None:
        self._idle.set()  # nothing more can be answered
        await self._inner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


async def _answer_probes_then_relay(server: Server[Any], state: Any, read_stream: ReadStream[Inbound],
                                    write_stream: _Answers, relay: MemoryObjectSendStream[Inbound],
                                    stop: GracefulStop | None) -> None:
    deciding = True
    try:
        async with read_stream, relay:
            async for item in read_stream:
                if isinstance(item, Exception):  # the stdio reader could not parse the line
                    repaired = _repaired(item)
                    if isinstance(repaired, Exception):
                        await write_stream.send(SessionMessage(_unreadable(repaired)))
                        continue
                    item = repaired
                request = _request_of(item)
                if deciding and request is not None and request.method == DISCOVER:
                    await write_stream.send(SessionMessage(await _discover(server, state, request)))
                    continue
                if request is not None:
                    deciding = False  # this request decides the era; the SDK loop sees it first
                write_stream.expect(item)
                await relay.send(item)
            if stop is not None:
                stop.request(END_OF_INPUT)
            await write_stream.all_answered()  # no call can arrive any more; each one read gets its answer
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        log.debug("stdio connection closed while relaying")


def _repaired(exc: Exception) -> SessionMessage | Exception:
    """The message of a line refused only for its lone surrogate escapes, read with U+FFFD in their
    place (both stdio readers hand on pydantic's error, which carries the line); else `exc` itself."""
    if not isinstance(exc, ValidationError):
        return exc
    line = next((e.get("input") for e in exc.errors() if e["type"] == "json_invalid"), None)
    if not isinstance(line, (bytes, str)):
        return exc
    fixed = repair_surrogates(line.encode() if isinstance(line, str) else line)
    if fixed is None:
        return exc
    try:
        return SessionMessage(jsonrpc_message_adapter.validate_json(fixed, by_name=False))
    except ValidationError as again:
        return again


def _unreadable(exc: Exception) -> JSONRPCError:
    bad_json = isinstance(exc, ValidationError) and any(e["type"] == "json_invalid" for e in exc.errors())
    error = ErrorData(code=PARSE_ERROR, message="Parse error") if bad_json else \
        ErrorData(code=INVALID_REQUEST, message="Invalid Request: not a JSON-RPC 2.0 message")
    return JSONRPCError(jsonrpc="2.0", id=None, error=error)


def _request_of(item: Inbound) -> JSONRPCRequest | None:
    if isinstance(item, SessionMessage) and isinstance(item.message, JSONRPCRequest):
        return item.message
    return None


async def _discover(server: Server[Any], state: Any,
                    request: JSONRPCRequest) -> JSONRPCResponse | JSONRPCError:
    """Answers one discovery probe the way the 2026-07-28 loop would, without opening a connection era."""
    params = request.params
    route = classify_inbound_request({"method": request.method, "params": params})
    try:
        if isinstance(route, InboundLadderRejection):
            raise MCPError(code=route.code, message=route.message, data=route.data)
        connection = Connection.from_envelope(route.protocol_version, route.client_info,
                                              route.client_capabilities)
        result = await serve_one(server, _ProbeContext(request.id), request.method, params,
                                 connection=connection, lifespan_state=state)
    except Exception as exc:  # noqa: BLE001 - mapped to the wire exactly as the modern loop maps it
        return JSONRPCError(jsonrpc="2.0", id=request.id, error=modern_error_data(exc))
    return JSONRPCResponse(jsonrpc="2.0", id=request.id, result=result)


@dataclass
class _ProbeContext:
    """The dispatch context of a discovery probe: nothing to send back but the answer itself."""

    request_id: RequestId
    message_metadata: MessageMetadata = None
    transport: TransportContext = field(default_factory=lambda: TransportContext(kind="jsonrpc",
                                                                                  can_send_request=False))
    cancel_requested: anyio.Event = field(default_factory=anyio.Event)
    can_send_request: bool = False

    async def send_raw_request(self, method: str, params: Mapping[str, Any] | None,
                               opts: Any = None) -> dict[str, Any]:
        raise NoBackChannelError(method)

    async def notify(self, method: str, params: Mapping[str, Any] | None, opts: Any = None) -> None:
        log.debug("dropped %s sent while answering a discovery probe", method)

    async def progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        return None

