"""What flux_mcp.compat (and the SDK internals stdio.py drives) assume of the MCP SDK, pinned.

flux-mcp is verified with mcp / mcp-types 2.3.x. An SDK upgrade that moves or reshapes one of these
names fails here first, and the message names the shim to fix, instead of failing deep inside a
transport test.
"""

from __future__ import annotations

import contextvars
import inspect
from importlib.metadata import version
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.server.lowlevel.server import Server
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPDeprecationWarning
from mcp_types import EmptyResult, SetLevelRequestParams

from flux_mcp import compat
from flux_mcp.server import build_server

pytestmark = pytest.mark.anyio
SHIM = "flux_mcp.compat.{}: "


def params_of(fn: Any) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_sdk_is_the_minor_version_these_shims_were_verified_with():
    for dist in ("mcp", "mcp-types"):
        assert version(dist).startswith("2.3."), (
            f"{dist} {version(dist)} is installed; flux_mcp.compat was verified with 2.3.x. Re-check every shim "
            "below against the new SDK, then widen the pin in pyproject.toml.")


def test_lowlevel_reaches_the_server_the_serving_loops_take(make_settings):
    server = build_server(make_settings())
    assert hasattr(server, "_lowlevel_server"), SHIM.format("lowlevel") + "MCPServer._lowlevel_server is gone"
    inner = compat.lowlevel(server)
    assert isinstance(inner, Server), SHIM.format("lowlevel") + f"got {type(inner).__name__}, not lowlevel Server"
    # stdio.serve_streams enters the low-level lifespan and asks it for its initialization options.
    assert callable(inner.lifespan) and callable(inner.create_initialization_options)


def test_the_runner_functions_stdio_drives_keep_their_signatures():
    from mcp.server.connection import Connection
    from mcp.server.runner import modern_error_data, serve_dual_era_loop, serve_one
    from mcp.shared.inbound import InboundLadderRejection, classify_inbound_request

    where = "flux_mcp.stdio: "
    assert params_of(serve_dual_era_loop)[:3] == ["server", "read_stream", "write_stream"], where + "serve_dual_era_loop"
    assert {"lifespan_state", "init_options"} <= set(params_of(serve_dual_era_loop)), where + "serve_dual_era_loop"
    assert params_of(serve_one)[:4] == ["server", "dctx", "method", "params"], where + "serve_one"
    assert {"connection", "lifespan_state"} <= set(params_of(serve_one)), where + "serve_one"
    assert params_of(Connection.from_envelope)[:3] == ["protocol_version", "client_info", "client_capabilities"], \
        where + "Connection.from_envelope"
    assert params_of(modern_error_data) == ["exc"], where + "modern_error_data"
    assert {"code", "message", "data"} <= set(inspect.signature(InboundLadderRejection).parameters)
    route = classify_inbound_request({"method": "server/discover", "params": {}})
    assert isinstance(route, InboundLadderRejection), where + "a probe without the 2026 envelope is no longer refused"


def test_the_probe_context_has_every_member_of_the_sdks_dispatch_context():
    from mcp.shared.dispatcher import DispatchContext
    from typing_extensions import get_protocol_members

    from flux_mcp.stdio import _ProbeContext

    probe = _ProbeContext(request_id=1)
    missing = sorted(m for m in get_protocol_members(DispatchContext) if not hasattr(probe, m))
    assert not missing, f"flux_mcp.stdio._ProbeContext lacks DispatchContext members {missing}"


async def test_add_request_handler_serves_a_method_mcpserver_lacks():
    server = MCPServer("pin")
    seen: list[str] = []

    async def accept(_ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
        seen.append(params.level)
        return EmptyResult()

    assert params_of(Server.add_request_handler)[1:] == ["method", "params_type", "handler"], \
        SHIM.format("add_request_handler") + "Server.add_request_handler changed its signature"
    compat.add_request_handler(server, "logging/setLevel", SetLevelRequestParams, accept)
    async with Client(server, mode="legacy") as client:
        assert client.server_capabilities.logging is not None, \
            SHIM.format("add_request_handler") + "a setLevel handler no longer advertises the logging capability"
        with anyio.fail_after(5), pytest.warns(MCPDeprecationWarning):  # logging is gone in 2026-07-28
            await client.set_logging_level("warning")
    assert seen == ["warning"], SHIM.format("add_request_handler") + "the handler was not called"


async def test_drop_middleware_edits_the_chain_every_message_goes_through():
    server = MCPServer("pin")
    assert isinstance(server.middleware, list), SHIM.format("drop_middleware") + "MCPServer.middleware is no list"
    assert server.middleware is compat.lowlevel(server).middleware, \
        SHIM.format("drop_middleware") + "MCPServer.middleware is no longer the chain the runner uses"
    assert "OpenTelemetryMiddleware" in [type(m).__name__ for m in server.middleware], \
        SHIM.format("drop_middleware") + "the SDK's tracing middleware is no longer called OpenTelemetryMiddleware"
    calls: list[str] = []

    async def observe(ctx: Any, call_next: Any) -> Any:
        calls.append(ctx.method)
        return await call_next(ctx)

    server.middleware.append(observe)
    compat.drop_middleware(server, "OpenTelemetryMiddleware")
    assert "OpenTelemetryMiddleware" not in [type(m).__name__ for m in server.middleware]
    async with Client(server) as client:
        await client.list_tools()
    assert "tools/list" in calls, SHIM.format("drop_middleware") + "the middleware list is not the live chain"


async def test_message_streams_carry_the_senders_context():
    marker: contextvars.ContextVar[str] = contextvars.ContextVar("marker", default="receiver")
    send, receive = compat.message_streams[str](1)
    marker.set("sender")
    await send.send("hello")
    marker.set("receiver")
    assert await receive.receive() == "hello"
    context = getattr(receive, "last_context", None)
    assert isinstance(context, contextvars.Context), \
        SHIM.format("message_streams") + "the receive side no longer exposes last_context"
    assert context.run(marker.get) == "sender"
    assert callable(send.aclose) and callable(receive.aclose) and hasattr(receive, "__aiter__")
    await send.aclose()
    await receive.aclose()


def test_the_stream_protocols_are_the_ones_the_serving_loop_is_typed_with():
    from mcp.server import runner

    hints = inspect.signature(runner.serve_dual_era_loop).parameters
    assert "ReadStream" in str(hints["read_stream"].annotation), "flux_mcp.compat.ReadStream: the loop's type moved"
    assert "WriteStream" in str(hints["write_stream"].annotation), "flux_mcp.compat.WriteStream: the loop's type moved"
    for name in ("receive", "aclose", "__aiter__", "__anext__"):
        assert hasattr(compat.ReadStream, name)
    for name in ("send", "aclose"):
        assert hasattr(compat.WriteStream, name)


async def test_resource_reads_go_through_mcpserver_read_resource():
    """flux_mcp.server._Server relabels binary resources by overriding the public read_resource."""

    class Relabel(MCPServer[Any]):
        async def read_resource(self, uri: Any, context: Any = None) -> Any:
            return [type(item)(item.content, "image/x-relabelled", item.meta)
                    for item in await super().read_resource(uri, context)]

    server = Relabel("pin")

    @server.resource("pin://blob/{n}", mime_type="image/png")
    async def blob(n: str) -> bytes:
        return b"\x00" * int(n)

    async with Client(server) as client:
        result = await client.read_resource("pin://blob/3")
    assert result.contents[0].mime_type == "image/x-relabelled", \
        "flux_mcp.server._Server: resources/read no longer goes through MCPServer.read_resource"


async def test_tools_and_prompts_go_through_the_public_methods_the_server_overrides():
    """flux_mcp.server._Server cleans descriptions and adds icons in add_tool/add_prompt, compacts the
    schemas in list_tools and refuses unknown arguments in call_tool: each must stay the SDK's route,
    and call_tool must still see the arguments as sent (the SDK's own argument model ignores extras)."""
    seen: list[Any] = []

    class Spy(MCPServer[Any]):
        def add_tool(self, fn: Any, *args: Any, **kwargs: Any) -> None:
            seen.append("add_tool")
            super().add_tool(fn, *args, **kwargs)

        def add_prompt(self, prompt: Any) -> None:
            seen.append("add_prompt")
            super().add_prompt(prompt)

        async def list_tools(self) -> Any:
            seen.append("list_tools")
            return await super().list_tools()

        async def call_tool(self, name: str, arguments: dict[str, Any], context: Any = None) -> Any:
            seen.append(("call_tool", dict(arguments)))
            return await super().call_tool(name, arguments, context)

    server = Spy("pin")

    @server.tool()
    def echo(x: int) -> str:
        return str(x)

    @server.prompt()
    def hello() -> str:
        return "hello"

    async with Client(server) as client:
        await client.list_tools()
        result = await client.call_tool("echo", {"x": 1, "extra": 2})
    where = "flux_mcp.server._Server: "
    assert seen[:2] == ["add_tool", "add_prompt"], where + "the decorators no longer call add_tool/add_prompt"
    assert "list_tools" in seen, where + "tools/list no longer goes through MCPServer.list_tools"
    assert ("call_tool", {"x": 1, "extra": 2}) in seen, where + "tools/call no longer goes through call_tool"
    assert not result.is_error, where + "the SDK refuses extra arguments itself now: _Server.call_tool's refusal may go"
    overridden = inspect.signature(MCPServer.add_tool).parameters
    from flux_mcp.server import _Server

    assert list(inspect.signature(_Server.add_tool).parameters) == list(overridden), \
        where + "MCPServer.add_tool changed its parameters"


def test_open_sessions_lists_the_session_managers_live_sessions():
    from mcp.server.streamable_http_manager import StreamableHTTPSessionManager

    manager = StreamableHTTPSessionManager(MCPServer("pin")._lowlevel_server)
    assert isinstance(getattr(manager, "_server_instances", None), dict), \
        SHIM.format("open_sessions") + "StreamableHTTPSessionManager._server_instances is gone or no dict"
    assert list(compat.open_sessions(manager)) == []
    transport = manager._admit_session(None)
    assert transport is not None and transport.mcp_session_id in compat.open_sessions(manager), \
        SHIM.format("open_sessions") + "an admitted session is not listed"
    manager._server_instances.pop(transport.mcp_session_id)
    assert transport.mcp_session_id not in compat.open_sessions(manager), \
        SHIM.format("open_sessions") + "the listing is not live"
