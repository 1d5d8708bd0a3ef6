"""The HTTP transports (SSE, streamable HTTP): Host/Origin checks, bearer token, body size cap."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import Settings
from .shared import HEALTH_PATHS, LOCAL, PRINCIPAL_KEY, match_token, token_principals

MAX_BODY_BYTES = 16 * 1024 * 1024
"""Large enough for an edit_image call carrying a data: URI, small enough to refuse abuse early."""
_LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"]
_LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, IPv6 possibly in brackets) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def security_settings(host: str, port: int, extra_hosts: list[str] | None = None, *,
                      token_required: bool = False) -> TransportSecuritySettings:
    """DNS-rebinding protection: only the bound address (and loopback names) as Host, only local Origins.

    A server bound to a public address must have a bearer token; there a rebinding page cannot know the
    token, and clients reach the server under names this process cannot list, so Host is not checked.
    """
    if token_required and not is_loopback(host):
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    hosts = list(_LOOPBACK_HOSTS)
    if host not in ("127.0.0.1", "localhost", "::1", "0.0.0.0", "::"):
        hosts += [f"{host}:{port}", host]
    hosts += extra_hosts or []
    origins = list(_LOOPBACK_ORIGINS) + [f"http://{h}" for h in extra_hosts or []] + \
        [f"https://{h}" for h in extra_hosts or []]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                     allowed_origins=origins)


class BearerTokenMiddleware:
    """Requires `Authorization: Bearer <token>` on every HTTP request but the health routes: the one
    FLUX_MCP_AUTH_TOKEN or one of FLUX_MCP_AUTH_TOKENS (constant-time checks). The token's user name
    (`local` for the single shared token) is left in the request's state as its principal."""

    def __init__(self, app: ASGIApp, token: str | None = None, *, tokens: list[tuple[bytes, str]] | None = None):
        self.app = app
        self.tokens = list(tokens or []) + ([(token.encode(), LOCAL)] if token else [])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in HEALTH_PATHS and scope.get("method") == "GET":
            await self.app(scope, receive, send)
            return
        supplied = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = credential.strip()
                break
        principal = match_token(supplied, self.tokens) if supplied else None
        if principal is None:
            body = json.dumps({"error": "unauthorized",
                               "error_description": "Send 'Authorization: Bearer <your token>' (FLUX_MCP_AUTH_TOKEN "
                                                    "or your entry of FLUX_MCP_AUTH_TOKENS)."}).encode()
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"content-type", b"application/json"), (b"www-authenticate", b'Bearer realm="flux-mcp"'),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)


def http_app(settings: Settings, transport: str, host: str, port: int, **server_kwargs: Any) -> ASGIApp:
    """The ASGI app for `transport`, with the security layers in front of it."""
    from .server import build_server

    server = build_server(settings, **server_kwargs)
    security = security_settings(host, port, token_required=settings.http_auth)
    if transport == "sse":
        app: ASGIApp = server.sse_app(transport_security=security, max_request_body_size=MAX_BODY_BYTES, host=host)
    else:
        # Shared mode: any replica answers any request, so no session lives in one process's memory.
        app = server.streamable_http_app(transport_security=security, max_request_body_size=MAX_BODY_BYTES,
                                         host=host, stateless_http=settings.shared)
    if settings.http_auth:
        app = BearerTokenMiddleware(app, tokens=token_principals(settings.auth_token, settings.auth_tokens))
    return app


def serve_http(settings: Settings, transport: str, host: str, port: int) -> None:
    import uvicorn

    app = http_app(settings, transport, host, port)
    config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(), access_log=False,
                            log_config=None, lifespan="on", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
