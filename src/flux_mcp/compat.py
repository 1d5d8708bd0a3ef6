"""Every use of an MCP SDK name that is not public API, in one place.

flux-mcp is verified against `mcp` and `mcp-types` 2.3.x (pinned in pyproject.toml). What each shim
below assumes is pinned by tests/test_compat.py, so an SDK upgrade that moves one of these names
fails there first, naming the shim, rather than deep inside a transport. Where the SDK has a public
route (the `MCPServer.middleware` property, `Server.add_request_handler`), the shims take it and
reach for a private name only to get to the object that route lives on.

The private names used:

- `MCPServer._lowlevel_server`: the low-level `Server` an `MCPServer` wraps. The dual-era serving
  loop and the single-request driver (`mcp.server.runner`) take only that type, and methods the
  high-level server does not expose (`logging/setLevel`) are registered on it; the SDK's own
  in-memory client reaches it the same way (a public accessor is an open TODO there).
- `mcp.shared._context_streams.create_context_streams`, here `message_streams`: memory streams
  that carry the sender's `contextvars` to the receiver, made as the SDK's own stdio transport makes
  them (`message_streams[T](buffer)` -> `(send, receive)`); the serving loop reads `last_context`
  off the receive side to run each handler in its sender's context.
- `mcp.shared._stream_protocols.ReadStream` / `WriteStream`: the stream protocols the serving loop
  is typed with (used in annotations only).
- `StreamableHTTPSessionManager._server_instances`, here `open_sessions`: the sessions the manager
  holds open, keyed by session id (the manager exposes a global cap, `max_sessions`, but neither a
  per-client one nor the list; the per-client limit in front of it needs to know which of a client's
  sessions have ended or expired).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any, TypeVar

from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared._context_streams import create_context_streams as message_streams
from mcp.shared._stream_protocols import ReadStream, WriteStream
from pydantic import BaseModel

if TYPE_CHECKING:
    from mcp.server.lowlevel.server import RequestHandler
    from mcp.server.mcpserver.tools import Tool
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

__all__ = ["ReadStream", "WriteStream", "add_request_handler", "drop_middleware", "lowlevel", "message_streams",
           "open_sessions", "registered_tool"]

_P = TypeVar("_P", bound=BaseModel)


def lowlevel(server: MCPServer[Any]) -> Server[Any]:
    """The low-level `Server` that `server` wraps (what the SDK's serving loops take)."""
    return server._lowlevel_server


def add_request_handler(server: MCPServer[Any], method: str, params_type: type[_P],
                        handler: RequestHandler[Any, _P]) -> None:
    """Serves `method` with `handler` (params validated against `params_type`), replacing the SDK's own
    handler if it has one; the SDK's documented route for re-providing a method MCPServer lacks."""
    lowlevel(server).add_request_handler(method, params_type, handler)


def drop_middleware(server: MCPServer[Any], class_name: str) -> None:
    """Removes every middleware of that class name from `server`'s chain (the public, mutable
    `MCPServer.middleware` list, outermost first)."""
    server.middleware[:] = [m for m in server.middleware if type(m).__name__ != class_name]


def registered_tool(server: MCPServer[Any], name: str) -> Tool:
    """The SDK's `Tool` registered under `name` (its `fn_metadata` fields are read live: the SDK documents
    that reassigning them takes effect on the next call)."""
    tool = server._tool_manager.get_tool(name)
    assert tool is not None, name
    return tool


def open_sessions(manager: StreamableHTTPSessionManager) -> Collection[str]:
    """The ids of the streamable-HTTP sessions `manager` holds open now (ended and expired ones are gone:
    the manager drops a session the moment it ends)."""
    return manager._server_instances.keys()
