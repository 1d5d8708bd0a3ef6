"""Which folders a tool call may read and write: the folder policy of each client session.

The order is: `FLUX_MCP_ALLOWED_DIRS` when set; else the roots the client lists (only handshake-era
clients offer roots; the 2026-07-28 protocol has none); else the server's working directory. The
filesystem root and the home folder itself are never allowed (see `paths.usable_folders`).

A tool asks once per call::

    policy = await state.folders.policy_for(ctx)

Two caches keep that cheap: each session's roots are asked for once and kept `ROOTS_TTL` seconds
(a client that changes its roots is followed within that time), and the policy built from one set
of roots is kept `POLICY_TTL` seconds (resolving folders costs syscalls on every call; a folder
created or removed is seen by then).
"""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio
from mcp.server.mcpserver import Context

from .config import Settings
from .paths import PathPolicy, to_local_path, usable_folders

log = logging.getLogger("flux_mcp.folders")

ROOTS_TTL = 30.0
"""Seconds a session's listed roots are kept before they are asked for again."""
POLICY_TTL = 5.0
"""Seconds before the allowed folders of one set of roots are resolved again."""
ROOTS_TIMEOUT = 5.0
"""Seconds a client gets to answer roots/list; after that the call goes on without its roots."""
MODERN_ERA = "2026-07-28"
"""The first protocol version without roots."""

_K = TypeVar("_K")
_V = TypeVar("_V")


class Expiring(Generic[_K, _V]):
    """A small map whose entries are forgotten after `ttl` seconds; past `size` entries the oldest goes."""

    def __init__(self, ttl: float, size: int = 256):
        self.ttl, self.size = ttl, size
        self._items: dict[_K, tuple[float, _V]] = {}

    def get(self, key: _K) -> _V | None:
        hit = self._items.get(key)
        return hit[1] if hit is not None and time.monotonic() - hit[0] < self.ttl else None

    def put(self, key: _K, value: _V) -> None:
        self._items[key] = (time.monotonic(), value)
        if len(self._items) > self.size:
            self._items.pop(next(iter(self._items)))


class Folders:
    """The folder policy of one server: its settings and the roots and policy caches."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.roots: Expiring[int, list[Path]] = Expiring(ROOTS_TTL)
        """Each session's roots, as its client listed them (keyed by the session object's id)."""
        self.policies: Expiring[tuple[Path, ...], PathPolicy] = Expiring(POLICY_TTL)
        """The policy built from each set of roots."""

    async def policy_for(self, ctx: Context[Any, Any]) -> PathPolicy:
        """The folders this request may use. Never raises: a client whose roots cannot be listed gets
        the policy of a client without roots."""
        roots = await self.client_roots(ctx)
        policy = self.policies.get(tuple(roots))
        if policy is None:
            policy = self.build(roots)
            self.policies.put(tuple(roots), policy)
        return policy

    def build(self, roots: list[Path]) -> PathPolicy:
        """The policy for a client with these roots (empty: it offered none)."""
        settings = self.settings
        if settings.allowed_dirs:
            allowed = usable_folders(settings.allowed_dirs, settings.home)
            # Relative paths land in the client's workspace when that is inside an allowed folder.
            inside = [r for r in roots if any(r == a or r.is_relative_to(a) for a in allowed)]
            return PathPolicy(inside[:1] + [a for a in allowed if a not in inside[:1]], settings.home)
        return PathPolicy(usable_folders(roots or [settings.cwd], settings.home), settings.home)

    async def client_roots(self, ctx: Context[Any, Any]) -> list[Path]:
        """The local folders among the client's roots; empty when it offers none (or fails to list them)."""
        caps = ctx.client_capabilities
        if caps is None or caps.roots is None:
            return []
        if (ctx.protocol_version or "") >= MODERN_ERA:
            return []  # roots are a handshake-era feature; modern clients send none
        session = ctx.session
        key = id(session)
        cached = self.roots.get(key)
        if cached is not None:
            return cached
        try:
            with anyio.fail_after(ROOTS_TIMEOUT), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the SDK warns that roots are deprecated in 2026-07-28
                listed = await session.list_roots()
        except Exception as exc:  # noqa: BLE001 - a client's broken roots/list must not fail the tool call
            log.info("client offered roots but roots/list failed: %s", exc)
            return []
        roots = [to_local_path(str(root.uri)) for root in listed.roots if str(root.uri).startswith("file://")]
        self.roots.put(key, roots)
        return roots
