"""The HTTP transports (SSE, streamable HTTP): Host/Origin checks, bearer token or OAuth (`oauth`), body size cap.

What one client can hold is bounded before it authenticates (`httpguard`: read deadlines and a
connection cap; `middleware`: the body read once under its cap, open sessions per client) and a
bearer token must be long enough to resist guessing, with failed attempts throttled per address.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from collections.abc import Iterator
from typing import Any

import anyio
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

from .compat import open_sessions
from .config import Settings
from .errors import ConfigError
from .httpguard import HttpLimits, Occasional, QuietRepeats, uvicorn_config
from .lifecycle import graceful_stop
from .middleware import BodyGuard, FailureThrottle, SessionLimit, client_key, refuse_throttled, send_json
from .shared import HEALTH_PATHS, LOCAL, PRINCIPAL_KEY, match_token, token_principals
from .uploads import PATH as UPLOAD_PATH

log = logging.getLogger("flux_mcp.http")

MAX_BODY_BYTES = 16 * 1024 * 1024
"""Large enough for an edit_image call carrying a data: URI, small enough to refuse abuse early."""
_LOOPBACK_HOSTS = ["127.0.0.1:*", "localhost:*", "[::1]:*", "127.0.0.1", "localhost", "[::1]"]
_LOOPBACK_ORIGINS = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
MIN_TOKEN_LENGTH = 32
MIN_TOKEN_DISTINCT = 8
MAKE_TOKEN = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'


def token_problem(token: str, variable: str = "FLUX_MCP_AUTH_TOKEN") -> str | None:
    """Why `token` is too weak to guard an HTTP server (None: it is not), without ever quoting it."""
    if len(token) < MIN_TOKEN_LENGTH:
        why = f"is {len(token)} characters long; at least {MIN_TOKEN_LENGTH} are required"
    elif len(set(token)) < MIN_TOKEN_DISTINCT:
        why = f"repeats too few characters ({len(set(token))} different; at least {MIN_TOKEN_DISTINCT})"
    else:
        return None
    return f"{variable} {why}, so that it cannot be guessed. Make one with: {MAKE_TOKEN}"


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
    (`local` for the single token) is left in the request's state as its principal.

    Failed attempts spend a per-address allowance (`FailureThrottle`); once it is spent the address is
    answered 429 with Retry-After, whatever it presents, until the allowance comes back. Failures are
    logged with the address, never with what was presented.
    """

    def __init__(self, app: ASGIApp, token: str | None = None, throttle: FailureThrottle | None = None, *,
                 tokens: list[tuple[bytes, str]] | None = None, own_auth: tuple[str, ...] = ()):
        self.app = app
        self.own_auth = own_auth
        """Path prefixes whose routes authenticate by themselves (shared mode: upload links, gallery cookie)."""
        self.tokens = list(tokens or []) + ([(token.encode(), LOCAL)] if token else [])
        self.throttle = throttle or FailureThrottle(HttpLimits.auth_burst, HttpLimits.auth_per_second)
        self._occasional = Occasional()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("path") in HEALTH_PATHS and scope.get("method") == "GET":
            await self.app(scope, receive, send)  # up or ready, nothing more: a load balancer has no token
            return
        if self.own_auth and str(scope.get("path", "")).startswith(self.own_auth):
            await self.app(scope, receive, send)
            return
        client = client_key(scope)
        wait = self.throttle.retry_after(client)
        if wait:
            await refuse_throttled(send, client, wait, self._occasional, log, "wrong bearer tokens")
            return
        supplied: bytes | None = None
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, credential = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    supplied = credential.strip()
                break
        principal = match_token(supplied, self.tokens) if supplied else None
        if principal is None:
            failures = self.throttle.failed(client)
            log.warning("refused an HTTP request from %s: %s bearer token (%d recent failed attempt%s)", client,
                        "no" if supplied is None else "a wrong", failures, "" if failures == 1 else "s")
            await send_json(send, 401, {"error": "unauthorized",
                                        "error_description": "Send 'Authorization: Bearer <your token>' "
                                                             "(FLUX_MCP_AUTH_TOKEN or your entry of "
                                                             "FLUX_MCP_AUTH_TOKENS)."},
                            [(b"www-authenticate", b'Bearer realm="flux-mcp"')])
            return
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)


def http_app(settings: Settings, transport: str, host: str, port: int, limits: HttpLimits | None = None,
             **server_kwargs: Any) -> ASGIApp:
    """The ASGI app for `transport`, with the security layers in front of it."""
    from .server import build_server

    limits = limits or HttpLimits(sessions_per_client=settings.sessions_per_client)
    token = settings.auth_token.get_secret_value() if settings.auth_token is not None else None
    if token is not None and (problem := token_problem(token)):
        raise ConfigError(problem)
    for name, named in settings.auth_tokens:
        if problem := token_problem(named.get_secret_value(), f"FLUX_MCP_AUTH_TOKENS' entry for {name}"):
            raise ConfigError(problem)
    from .oauth import ResourceServer

    oauth = ResourceServer(settings.oauth, endpoint="/sse" if transport == "sse" else "/mcp") \
        if settings.oauth is not None else None
    server = build_server(settings, oauth=oauth, **server_kwargs)
    security = security_settings(host, port, token_required=settings.http_auth)
    if transport == "sse":
        app: ASGIApp = server.sse_app(transport_security=security, max_request_body_size=MAX_BODY_BYTES, host=host)
    else:
        # Shared mode: any replica answers any request, so no session lives in one process's memory.
        app = server.streamable_http_app(transport_security=security, max_request_body_size=MAX_BODY_BYTES,
                                         host=host, stateless_http=settings.shared,
                                         session_idle_timeout=limits.session_idle_seconds,
                                         max_sessions=limits.max_sessions)
    if not settings.shared and oauth is None:  # the gallery reads the local journal and data folder, every user's
        _mount_gallery(app, settings, host)
    sdk_app = app = oauth.wrap_sdk_app(app) if oauth is not None else app
    # Shared mode: upload links are the capability of their own routes, and cap their own bodies; the
    # gallery's session cookie guards it (see `uploads`, `gallery.remote`).
    own_auth = (UPLOAD_PATH, "/gallery/", "/gallery") if settings.shared else ()
    app = BodyGuard(app, MAX_BODY_BYTES, own_limit=(UPLOAD_PATH,) if settings.shared else ())
    # Stateless (shared mode) opens no session to limit, and behind a load balancer every call comes from its
    # address: counting calls there would refuse the 33rd simultaneous call of the whole team.
    if transport != "sse" and not settings.shared:
        manager = server.session_manager
        app = SessionLimit(app, lambda: open_sessions(manager), limits.sessions_per_client)
    if oauth is not None:  # the SDK checks the token and answers the challenges; the gate throttles failures
        app = oauth.guard(app, sdk_app, limits)
    elif settings.http_auth:
        app = BearerTokenMiddleware(app, throttle=FailureThrottle(limits.auth_burst, limits.auth_per_second),
                                    tokens=token_principals(settings.auth_token, settings.auth_tokens),
                                    own_auth=own_auth)
    return app


def _mount_gallery(app: ASGIApp, settings: Settings, host: str) -> None:
    """The gallery page at /gallery, behind the same token as the MCP endpoint (without a token the server
    is loopback-only, and the gallery refuses a Host that is not this machine's: DNS rebinding)."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from .gallery import LOOPBACK_HOSTS, Gallery
    from .journal import open_journal
    from .store import FolderStore

    if not isinstance(app, Starlette):  # pragma: no cover - both SDK transports build a Starlette app
        return
    hosts = None if settings.auth_token is not None else (*LOOPBACK_HOSTS, host)
    gallery = Gallery(lambda: open_journal(settings.home), FolderStore(settings.home), allowed_hosts=hosts)
    app.router.routes.append(Mount("/gallery", app=gallery.app()))


def serve_http(settings: Settings, transport: str, host: str, port: int, limits: HttpLimits | None = None) -> None:
    """Serves until SIGTERM or SIGINT, then stops gracefully (see `flux_mcp.lifecycle`): calls arriving
    meanwhile are refused, paid submits in flight are answered and journaled, then uvicorn shuts down."""

    import uvicorn

    class Uvicorn(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield  # the graceful stop has the signals (uvicorn's own would stop before the paid submits end)

    limits = limits or HttpLimits(sessions_per_client=settings.sessions_per_client)
    QuietRepeats.install()
    app = http_app(settings, transport, host, port, limits)
    server = Uvicorn(uvicorn_config(app, host, port, limits, log_level=settings.log_level))

    def stop_serving(hurried: bool) -> None:
        server.should_exit = True
        server.force_exit = hurried

    def stop_accepting() -> None:
        # Shared mode (replicas behind a balancer), at the signal rather than once the paid submits are
        # answered: no new connection is accepted (the balancer sends the call to another replica, as for any
        # refused connection) and kept-alive connections close once their current answer is sent, so no call
        # arrives only to be refused; calls in flight run on. A single server keeps its door open and answers
        # each call with a "shutting down" tool error instead: its client has nowhere else to go.
        for listener in server.servers:
            listener.close()
        for connection in list(server.server_state.connections):
            connection.shutdown()

    async def serve() -> None:
        async with graceful_stop(stop_serving, stop_accepting=stop_accepting if settings.shared else None):
            await server.serve()

    anyio.run(serve)
