"""ASGI layers in front of the MCP apps: the request body read once (capped, lone surrogates
repaired), open sessions per client, and the failed-login throttle the bearer-token check uses.

Order, outermost first: bearer token (headers only: a client without the token never gets its body
read), session limit, body guard, the SDK's app.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .surrogates import repair_surrogates

if TYPE_CHECKING:
    from .httpguard import Occasional

MCP_SESSION_ID = b"mcp-session-id"


def client_key(scope: Scope) -> str:
    """Who a request comes from, for per-client limits: its address (an IPv6 address by its /64, which
    one machine typically holds whole)."""
    client = scope.get("client")
    host = client[0] if client else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host or "?"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


async def send_json(send: Send, status: int, body: dict[str, Any],
                    headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


def _rpc_error(message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": message}}


class BodyGuard:
    """Reads a request's body once, before the app: refuses it (413) past `max_bytes` without reading
    further, and replaces lone surrogate escapes by U+FFFD (see `surrogates`) so the SDK's parser can
    read the request and answer its id. The app then reads the body as if from the wire."""

    def __init__(self, app: ASGIApp, max_bytes: int, *, own_limit: Collection[str] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.own_limit = tuple(own_limit)
        """Path prefixes whose routes read (and cap) their bodies themselves: shared mode's upload links."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH") or (
                self.own_limit and str(scope.get("path", "")).startswith(self.own_limit)):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", []) if k == b"content-length"), b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_json(send, 413, _rpc_error(f"Request body over {self.max_bytes} bytes"))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await send_json(send, 413, _rpc_error(f"Request body over {self.max_bytes} bytes"))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        body = repair_surrogates(body) or body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


class SessionLimit:
    """At most `per_client` open streamable-HTTP sessions per client address: one local client could
    otherwise open sessions until the SDK's global cap, after which every new client is refused until
    sessions expire. `open_sessions` lists the session ids the SDK still holds (expired ones are gone)."""

    def __init__(self, app: ASGIApp, open_sessions: Callable[[], Collection[str]], per_client: int):
        self.app = app
        self.open_sessions = open_sessions
        self.per_client = per_client
        self._owned: dict[str, set[str]] = {}
        self._opening: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not _opens_session(scope):
            await self.app(scope, receive, send)
            return
        client = client_key(scope)
        owned = self._prune(client)
        if len(owned) + self._opening.get(client, 0) >= self.per_client:
            await send_json(send, 429, _rpc_error(
                f"Too many open sessions from this address ({self.per_client}): end unused ones (HTTP DELETE) "
                "or reuse one; idle sessions expire on their own."), [(b"retry-after", b"60")])
            return

        opening = True
        self._opening[client] = self._opening.get(client, 0) + 1

        def opened() -> None:
            nonlocal opening
            if opening:
                opening = False
                self._opening[client] -= 1
                if not self._opening[client]:
                    del self._opening[client]

        async def noting_session(message: Message) -> None:
            if message["type"] == "http.response.start":
                session = next((v.decode("latin-1") for k, v in message.get("headers", [])
                                if k.lower() == MCP_SESSION_ID), None)
                if session:
                    self._owned.setdefault(client, set()).add(session)
                opened()  # counted as owned from here on (an SSE answer's call lasts as long as its stream)
            await send(message)

        try:
            await self.app(scope, receive, noting_session)
        finally:
            opened()

    def _prune(self, client: str) -> set[str]:
        owned = self._owned.get(client)
        if not owned:
            return set()
        live = self.open_sessions()
        owned.intersection_update(live)
        if not owned:
            del self._owned[client]
        return owned


def _opens_session(scope: Scope) -> bool:
    """Whether the SDK opens a session for this request: a POST without a session id, in a handshake-era
    protocol version (or none). Requests of the 2026-07-28 era carry a newer version and no session."""
    if scope["type"] != "http" or scope["method"] != "POST":
        return False
    version: bytes | None = None
    for name, value in scope.get("headers", []):
        if name == MCP_SESSION_ID:
            return False
        if name == b"mcp-protocol-version":
            version = value
    return version is None or version.decode("latin-1") in HANDSHAKE_PROTOCOL_VERSIONS


async def refuse_throttled(send: Send, client: str, wait: int, occasional: Occasional, log: logging.Logger,
                           refused: str) -> None:
    """Answers a client throttled after repeated `refused` credentials: 429 with Retry-After, and a log line
    now and then (with how many attempts were refused since), never one per attempt."""
    held = occasional.due(f"throttled {client}")
    if held is not None:
        log.warning("throttling %s after repeated %s (retry in %d s%s)", client, refused, wait,
                    f"; {held} more attempts refused in the last minute" if held else "")
    await send_json(send, 429, {"error": "too_many_attempts",
                                "error_description": f"Too many failed attempts; retry in {wait} s."},
                    [(b"retry-after", str(wait).encode())])


class FailureThrottle:
    """A token bucket per client address that failed attempts spend: `burst` at once, then one every
    1/`per_second` seconds. Only failures count, so a client with the right token is never slowed."""

    def __init__(self, burst: int, per_second: float, *, clock: Callable[[], float] = time.monotonic,
                 max_clients: int = 10_000):
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        """client -> (tokens, when counted)"""

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.per_second)

    def retry_after(self, client: str) -> int:
        """Whole seconds until `client` may try again (0: now)."""
        now = self.clock()
        tokens = self._tokens(client, now)
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.per_second))

    def failed(self, client: str) -> int:
        """Counts a failure; returns how many the client made since its allowance was last whole."""
        now = self.clock()
        tokens = self._tokens(client, now) - 1
        if client not in self._buckets and len(self._buckets) >= self.max_clients:
            self._forget_recovered(now)
        self._buckets[client] = (tokens, now)
        return round(self.burst - tokens)

    def _forget_recovered(self, now: float) -> None:
        """Drops clients whose allowance is whole again (they carry no state); else the oldest half."""
        full = [c for c in self._buckets if self._tokens(c, now) >= self.burst]
        for c in full or sorted(self._buckets, key=lambda c: self._buckets[c][1])[: len(self._buckets) // 2]:
            del self._buckets[c]
