"""Shared by the money tests: a server whose clock the test sets, the ledger as a second reader sees it."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client

from flux_mcp.config import Settings
from flux_mcp.journal import Charge, open_journal
from flux_mcp.server import build_server
from tests.conftest import FAST_RETRY
from tests.fakes.wire import Fake


class Clock:
    """The time the budgets and confirmations are kept by, set by the test (UTC ISO moments)."""

    def __init__(self, moment: str):
        self.now = at(moment)

    def __call__(self) -> float:
        return self.now

    def set(self, moment: str) -> None:
        self.now = at(moment)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def at(moment: str) -> float:
    return dt.datetime.fromisoformat(moment).timestamp()


@contextlib.asynccontextmanager
async def serve(settings: Settings, fake: Fake | None, *, clock: Callable[[], float] = time.time,
                **client_kw: Any) -> AsyncIterator[Client]:
    """An MCP client connected in memory to a fresh server (provider calls to `fake`, budgets on `clock`)."""
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle)) if fake else None
    server = build_server(settings, http_client=http, retry=FAST_RETRY, clock=clock)
    try:
        async with Client(server, **client_kw) as client:
            yield client
    finally:
        if http is not None:
            await http.aclose()


async def charges(home: Path) -> list[Charge]:
    """Every row of the spend ledger, as another process reading the journal sees it."""
    journal = open_journal(home)
    try:
        return await journal.charges_since(0)
    finally:
        await journal.close()
