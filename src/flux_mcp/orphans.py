"""Orphan adoption: a key-less re-issue of a cut call attaches to that call's job instead of paying again.

Shared mode only (a journal with `Adopting`: PostgreSQL). On one server the rejoin of the service does
this with the process's own knowledge of which calls still have a caller (`JobRunner.in_flight`). Across
replicas that knowledge is gone: a call cut by its replica's death left a job nobody waits on, and the
client re-issues the call (MCP clients must re-issue a request whose response stream broke) to whichever
replica the load balancer picks. Without an idempotency key the only thing tying the re-issue to the job
is the call itself: the same principal and the same request key (`request.request_key`, the digest of the
arguments the rejoin uses), within FLUX_MCP_REJOIN_SECONDS.

* When a replica's reconciler takes over the lease of a job whose owner stopped renewing it, the job is
  marked an *orphan* (`orphaned_at`). A re-issue adopts the first un-adopted orphan of its call
  (`adopted_at` set, claimed with FOR UPDATE SKIP LOCKED), then waits on it as any join does. So two
  re-issues of two identical cut calls adopt two different orphans, and neither pays while an orphan is
  free. A job of the call whose lease has not lapsed yet (the re-issue came first) or that a cut call on a
  live replica let go of can be adopted too, by one re-issue only.
* A job whose replica died before the provider's answer was committed has no provider id: it is an
  intent, then `unknown` — unless the reconciler finds its job in the provider's history (see `replica`):
  then it is that job, an orphan like any other. An intent or an `unknown` job is not adoptable (nothing to wait on could bring its images, and whether the
  provider made it is not known); a re-issue that finds nothing to adopt is answered with it, never resubmits.
* A job a call on this replica still waits on is skipped (that call is not cut).
* An adopting call that is cancelled gives its adoption back; one whose replica dies keeps it (the next
  re-issue then starts a new job, as a call without an idempotency key may: pass one to be sure).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import anyio

from .journal import Record

log = logging.getLogger("flux_mcp.orphans")

_TRIES = 5
"""How many of the call's jobs a re-issue looks past (each one a call on this replica still waits on)."""


@runtime_checkable
class Adopting(Protocol):
    """A shared journal's adoption statements (`PgJournal`)."""

    async def adopt(self, principal: str, request_key: str, since: float,
                    skip: Sequence[str] = ()) -> tuple[Record, bool] | None:
        """The job a re-issue attaches to and whether it was adopted (see `PgJournal.adopt`)."""
        ...

    async def unadopt(self, prediction_id: str) -> None: ...


async def find(journal: Adopting, in_flight: Mapping[str, Callable[[], Awaitable[bool]]], principal: str,
               request_key: str, since: float) -> tuple[Record, bool] | None:
    """The job a key-less call of `principal` attaches to (adopted, or only joined), or None: a new job."""
    skip: list[str] = []
    for _ in range(_TRIES):
        found = await journal.adopt(principal, request_key, since, skip)
        if found is None:
            return None
        record, adopted = found
        alive = in_flight.get(record.id)
        if alive is None or not await alive():
            if adopted:
                log.info("adopted %s (an identical call's answer never reached its caller)", record.id)
            return found
        if adopted:  # a call here still waits on it: not an orphan, give it back
            with anyio.CancelScope(shield=True):
                await journal.unadopt(record.id)
        skip.append(record.id)
    return None


@contextlib.asynccontextmanager
async def holding(journal: Adopting, record: Record, adopted: bool) -> AsyncIterator[None]:
    """While the adopting call waits on the job: if it ends without an answer (cancelled, an error), the
    adoption is given back so the caller's next re-issue can adopt the job again."""
    try:
        yield
    except BaseException:
        if adopted:
            with anyio.CancelScope(shield=True):
                await journal.unadopt(record.id)
        raise
