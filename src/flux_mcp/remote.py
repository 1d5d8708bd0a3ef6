"""The shared mode's ways in and out for a person on another machine: the tools and HTTP routes of upload
links (`uploads`) and of the gallery (`gallery.remote`). Registered by `build_server` in shared mode only,
so a single user's `tools/list` does not pay for them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations

from .errors import error_result
from .gallery.remote import GALLERY_DOC, add_gallery_routes, gallery_link_text
from .uploads import UPLOAD_DOC, add_upload_route, public_base, upload_link_text

NOT_OVER_HTTP = ("Links need the server's address, which only an HTTP request carries; this connection has none "
                 "(stdio). Connect over HTTP to the shared server.")


def add_remote_io(server: MCPServer[Any], service: Callable[[], Any], principal_of: Callable[[Any], str]) -> None:
    """`create_upload_link` and `create_gallery_link`, `PUT /uploads/<link>` and `/gallery/` (see the modules).
    `service` answers the running FluxService (None before the server started); `principal_of` who calls."""
    link_annotations = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                       open_world_hint=False)

    async def create_upload_link(ctx: Context[Any, Any]) -> CallToolResult:
        base = public_base(getattr(ctx.request_context, "request", None))
        if base is None:
            return error_result(NOT_OVER_HTTP)
        running = ctx.request_context.lifespan_context.service
        link, ticket = await running.uploads.create(principal_of(ctx))
        text, data = upload_link_text(base, link, ticket)
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)

    async def create_gallery_link(ctx: Context[Any, Any]) -> CallToolResult:
        base = public_base(getattr(ctx.request_context, "request", None))
        if base is None:
            return error_result(NOT_OVER_HTTP)
        from .gallery.remote import Logins

        running = ctx.request_context.lifespan_context.service
        link, ticket = await Logins(running.store, running.money.clock).create(principal_of(ctx))
        text, data = gallery_link_text(base, link, ticket)
        return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data)

    create_upload_link.__doc__ = UPLOAD_DOC
    create_gallery_link.__doc__ = GALLERY_DOC
    server.tool(annotations=link_annotations)(create_upload_link)
    server.tool(annotations=link_annotations)(create_gallery_link)

    def uploads() -> Any:
        running = service()
        return None if running is None else running.uploads

    add_upload_route(server, uploads)
    add_gallery_routes(server, service)
