"""One replica among several on one PostgreSQL journal: leases, the heartbeat, the reconciler, wake-ups.

Shared mode only (FLUX_MCP_DATABASE_URL set); the server's lifespan starts a `Replica` and stops it.
A single server on SQLite has none of this: there is no other process to take a job over, so an
intent row and a lease would only cost statements (see `JobRunner`).

The protocol, whose statements live in `journal_pg.PgJournal` (the `Leases` methods):

* **Intent before the paid request.** The runner inserts an intent row (principal, request key,
  idempotency key, provider, model, lease owner = this replica, lease_until) and sends the submit only
  after it committed. Its unique (principal, idempotency_key) makes a same-key call on another replica
  attach to the existing job instead of submitting. The provider's answer replaces the intent by the
  real record in one statement. An intent whose owner's lease lapsed (the replica died mid-submit) is
  turned by the reconciler into a record with status `unknown`: the provider may have started the job;
  it is never resubmitted. If the stalled owner's answer arrives later it still writes the id (the row
  goes back to pending) and the job continues.
* **The provider's history** (providers with `find_submitted`, e.g. Atlas Cloud). Before a lapsed intent
  becomes `unknown` the reconciler holds it (epoch + 1, renewed by the heartbeat) and, in a task of its own
  (its pass goes on), reads the jobs the provider created since the intent was written. Exactly one job whose
  request is exactly the intent's, that no other row holds and that no other intent (pending or `unknown`,
  of any principal) could have made: the intent becomes that job (fenced, its charge billed, an orphan) and
  this replica drives it like any job it took over. Anything else (no such job, several, a rival intent,
  a history that cannot be read) leaves it `unknown`, as before, with the reason in its error.
* **Leases.** A pending job is driven (polled, settled, kept: the `JobRunner` steps) by the holder of
  its lease only. ONE heartbeat statement per replica renews all of its leases every `lease/4`, in a
  task of its own (a slow reconciler batch must never delay it). The reconciler, every `TICK` seconds,
  turns lapsed intents into `unknown` and claims pending jobs whose lease lapsed (`FOR UPDATE SKIP
  LOCKED`, epoch + 1) and drives each with `JobRunner.drive`. A call that ends while its job is still
  pending lets the lease go (nobody drives it until someone checks on it, as on a single server).
* **Fencing.** Writes of a held job carry `lease_owner = me AND lease_epoch = mine`; a replica stalled
  past its lease has its write dropped (`LeaseLost`: logged; the runner answers its own caller from
  the row as the new owner writes it). A final status never changes into another one.
* **Waiting across replicas.** A call about a job another live replica drives waits for the row,
  never polling the provider itself: one LISTEN connection per replica wakes an in-process event per
  job (`pg_notify` is sent in the statement that makes a job final), plus a re-read at least every
  second (a notification is lost while that connection reconnects). A wait holds no pooled connection.
* **Graceful stop** hands this replica's submitted jobs over from the signal on (their leases end at
  each reconciler pass while it stops; it claims none), and at its end ends every lease left
  (lease_until = now()), so others take its jobs over without waiting out the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from .errors import FluxError
from .journal import Record

if TYPE_CHECKING:
    from .jobs import JobRunner
    from .journal_pg import PgJournal
    from .money import Bill, Reservation
    from .paths import PathPolicy
    from .providers.base import Provider, SubmitLookup
    from .request import JobRequest

log = logging.getLogger("flux_mcp.replica")

LEASE_SECONDS = 10.0
"""How long a lease lasts without a heartbeat: the delay before another replica takes a dead one's jobs
over (FLUX_MCP_LEASE_SECONDS; `PgJournal.open(lease_seconds=...)`)."""
TICK = 0.3
"""Seconds between reconciler passes (claims of lapsed leases and lapsed intents)."""
REREAD = 1.0
"""The longest a wait for another replica's job goes without reading its row again."""
CAPACITY = 200
"""The most jobs one replica's reconciler drives at once (more wait for the next pass, or another replica)."""
CHANNEL = "flux_job_done"
"""The notification channel: the payload is the id of a job that just became final."""
LOOKBACK = 600.0
"""How long before a history lookup's window another intent may have been written and still have made a job
in it (its submit on its way that long, e.g. held open): such intents are rivals for the window's jobs."""
_STOPPED = "The server that sent this job's paid request stopped before the provider answered"
_NEVER = "It is never resubmitted: look in the provider's dashboard before starting it again."
NOT_IN_HISTORY = (f"{_STOPPED}, and the provider's history shows no job made by that request (a history may list "
                  f"a new job late), so whether the provider started the job is unknown. {_NEVER}")
IN_HISTORY_TWICE = (f"{_STOPPED}. The provider's history shows a job made by such a request, but another request "
                    "just like it (or several such jobs) could be the one, so this server cannot tell which job is "
                    f"this one: whether the provider started it is unknown. {_NEVER}")
HISTORY_UNREAD = (f"{_STOPPED}, and the provider's history could not be read, so whether the provider started the "
                  f"job is unknown. {_NEVER}")
NOT_MATCHED = (f"{_STOPPED}. Its request (an uploaded or inline input image) cannot be matched in the provider's "
               f"history, so whether the provider started the job is unknown. {_NEVER}")


def replica_id() -> str:
    """A lease owner name unique to this journal instance: host, process id and a random part."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(3)}"


class LeaseLost(Exception):  # a signal between the journal and the runner, never shown to users
    """A write of a job this replica held did not land: another replica took the job over (higher epoch)."""

    def __init__(self, prediction_id: str):
        super().__init__(prediction_id)
        self.prediction_id = prediction_id


class KeyTaken(Exception):  # a signal between the runner and the service, never shown to users
    """The intent of a new job found its idempotency key held by another job (another replica's, typically):
    nothing was sent; the call attaches to `record` instead."""

    def __init__(self, record: Record):
        super().__init__(record.id)
        self.record = record


@runtime_checkable
class Leases(Protocol):
    """The lease statements of a shared journal (`PgJournal`); the runner uses them when its journal has them."""

    owner: str
    """This replica's name in `lease_owner`."""

    async def intent(self, record: Record, reservation: Reservation | None = None) -> Record | None:
        """Inserts `record` (no provider id yet) as this replica's intent, with `reservation`'s charge in the
        same commit (its budget check made there: SpendRefused); returns None when it landed, or the job that
        already holds its (principal, idempotency_key), also one this replica wrote that is not in the database
        yet (the service's lookup by key before paying relies on it). Raises FluxError when the database
        cannot take it (then nothing may be sent)."""
        ...

    async def intent_failed(self, intent_id: str, error: str | None) -> None:
        """The submit failed: with `error` None nothing was created (the intent goes); otherwise the job may
        exist and the intent becomes `unknown` with `error`."""
        ...

    async def submitted(self, intent_id: str, record: Record, bill: Bill | None = None) -> bool:
        """Replaces the intent by the record the provider's answer made (lease kept by this replica), billing
        `bill`'s charge in the same commit; False when the write could not land yet (kept and retried, as
        `put`)."""
        ...

    async def claim(self, prediction_id: str) -> Record | None:
        """Takes the lease of a pending job nobody drives (or whose lease lapsed); the record, or None."""
        ...

    async def release(self, prediction_id: str, *, hand_over: bool = False) -> None:
        """Lets go of a held job: a pending one is left for whoever checks on it next, or (`hand_over`, the
        process is stopping) for another replica's reconciler to take over at once."""
        ...

    def forget(self, prediction_id: str) -> None:
        """Lets go of a held job that is final (no statement: nobody claims a final job)."""
        ...

    def holds(self, prediction_id: str) -> bool: ...

    async def watch(self, prediction_id: str) -> tuple[Record, bool] | None:
        """The job's row (an intent's id finds the record that replaced it) and whether a live lease is on it."""
        ...

    async def changed(self, prediction_id: str, timeout: float) -> None:
        """Returns when the job may have changed (a notification) or after `timeout` seconds."""
        ...


class Waits:
    """In-process events per job id, set when the job becomes final (by this replica or a notification)."""

    def __init__(self) -> None:
        self._events: dict[str, tuple[asyncio.Event, int]] = {}
        self.waiting = 0
        """Calls waiting right now (all jobs)."""

    async def wait(self, key: str, timeout: float) -> None:
        event, count = self._events.get(key) or (asyncio.Event(), 0)
        self._events[key] = (event, count + 1)
        self.waiting += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), max(timeout, 0.0))
        finally:
            self.waiting -= 1
            held = self._events.get(key)
            if held is not None and held[0] is event:
                if held[1] <= 1:
                    del self._events[key]
                else:
                    self._events[key] = (event, held[1] - 1)

    def wake(self, key: str) -> None:
        held = self._events.pop(key, None)
        if held is not None:
            held[0].set()

    def __len__(self) -> int:
        return len(self._events)


class Replica:
    """This process's part in the cluster: the heartbeat, the reconciler and the LISTEN connection."""

    def __init__(self, journal: PgJournal, runner: JobRunner, providers: Mapping[str, Provider],
                 paths: PathPolicy, *, tick: float = TICK, capacity: int = CAPACITY):
        self.journal = journal
        self.runner = runner
        self.providers = providers
        self.paths = paths
        self.tick = tick
        self.capacity = capacity
        self.driving: dict[str, asyncio.Task[None]] = {}
        """Jobs this replica's reconciler drives now."""
        self.listening = asyncio.Event()
        """Set while the LISTEN connection is up (tests wait on it)."""
        self.takeovers = 0
        """Jobs claimed from a lapsed lease so far (for logs and tests)."""
        self.found = 0
        """Intents whose job the provider's history showed, so far (for logs and tests)."""
        self.looking: set[asyncio.Task[None]] = set()
        """History lookups running now (each for the intents of one reconciler pass)."""
        self.listen_name = f"flux-mcp-listen {journal.owner}"[:63]
        """The LISTEN connection's application_name (one per replica)."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._heartbeat(), name="flux-mcp-heartbeat"),
                       loop.create_task(self._reconcile(), name="flux-mcp-reconciler"),
                       loop.create_task(self._listen(), name="flux-mcp-listen")]
        log.info("replica %s: lease %.1f s", self.journal.owner, self.journal.lease_seconds)

    async def stop(self) -> None:
        """Stops the tasks and ends this replica's leases at once (others take its jobs over now)."""
        tasks = [*self._tasks, *self.looking, *self.driving.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        with contextlib.suppress(Exception):
            ended = await self.journal.end_leases()
            if ended:
                log.info("replica %s stopped: %d lease(s) handed over", self.journal.owner, ended)

    # --- the tasks ----------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        """One statement every lease/4 renews every lease of this replica (its own task: nothing delays it)."""
        every = self.journal.lease_seconds / 4
        while True:
            try:
                await self.journal.heartbeat()
            except Exception as exc:  # the database away for a moment: the next beat tries again
                log.warning("heartbeat of %s failed: %s", self.journal.owner, _first_line(exc))
            await asyncio.sleep(every)

    async def _reconcile(self) -> None:
        from .lifecycle import inflight

        while True:
            await asyncio.sleep(self.tick)
            try:
                if inflight.stopping:  # SIGTERM: this replica's jobs go to the others now, none is taken
                    await self.hand_over_once()
                else:
                    await self.reconcile_once()
            except Exception as exc:
                log.warning("reconciler pass failed: %s", _first_line(exc))

    async def hand_over_once(self) -> int:
        """One pass of a stopping replica: the leases of its submitted pending jobs end now (another replica's
        reconciler claims each at its next pass and asks the provider at once), instead of when its graceful
        stop runs out and cuts their calls. Repeated every pass while it stops: a job submitted meanwhile, or
        renewed by a heartbeat before anyone claimed it, goes at the next one. Its calls still waiting on a
        job go on until the new owner's write, then answer from the row (`LeaseLost`)."""
        handed = await self.journal.hand_over_jobs()
        if handed:
            log.info("stopping: %d job(s) handed over to the other replicas", handed)
        return handed

    async def reconcile_once(self) -> int:
        """One pass: lapsed intents become `unknown` (or are looked for in their provider's history, in a task
        of their own), lapsed leases are claimed and driven. Returns how many jobs were claimed."""
        looking = [pid for pid, p in self.providers.items() if p.finds_submitted and p.configured]
        gave_up, held = await self.journal.expire_intents(looking)
        for rid in gave_up:
            log.warning("%s: its replica stopped before the provider answered the submit; the job may exist "
                        "and is reported as unknown (never resubmitted)", rid)
        if held:
            task = asyncio.get_running_loop().create_task(self._look_up(held), name="flux-mcp-history")
            self.looking.add(task)
            task.add_done_callback(self.looking.discard)
        room = self.capacity - len(self.driving)
        if room <= 0:
            return 0
        claimed = await self.journal.claim_lapsed(room)
        for record in claimed:
            self.takeovers += 1
            log.info("took over %s (its lease lapsed)", record.id)
            task = asyncio.get_running_loop().create_task(self._drive(record), name=f"flux-mcp-drive {record.id}")
            self.driving[record.id] = task
        return len(claimed)

    async def _look_up(self, intents: list[Record]) -> None:
        """Settles held intents from their providers' histories (one lookup per provider)."""
        by_provider: dict[str, list[Record]] = {}
        for intent in intents:
            by_provider.setdefault(intent.provider, []).append(intent)
        for pid, group in by_provider.items():
            try:
                await self._find(self.providers[pid], group)
            except Exception as exc:  # noqa: BLE001 - the database away: the held intents go back, to look again
                log.warning("history lookup of %d %s job(s) failed: %s", len(group), pid, _first_line(exc))
                for intent in group:
                    await self.journal.release(intent.id, hand_over=True)

    async def _find(self, provider: Provider, intents: list[Record]) -> None:
        since = min(i.created_at for i in intents)
        scrub = self.runner.redactor.scrub
        try:
            lookup = await provider.find_submitted({i.model for i in intents}, since, time.time())
        except FluxError as exc:
            log.warning("%s's history could not be read for %d job(s) (%s); reported unknown", provider.id,
                        len(intents), scrub(_first_line(exc)))
            for intent in intents:
                await self._settle(intent, None, HISTORY_UNREAD)
            return
        asked = {i.id: _asked(i) for i in intents}
        found = {i.id: _created_by(lookup, asked[i.id]) for i in intents}
        # Read after the history: an intent whose job the history shows was written before it was read.
        candidates = sorted({n for made in found.values() for n in made or ()})
        rivals, held = await self.journal.intent_rivals(provider.id, since - LOOKBACK, [i.id for i in intents],
                                                        candidates)
        everyone = [*((r, _asked(r)) for r in rivals), *((i, asked[i.id]) for i in intents)]
        for intent in intents:
            req, made = asked[intent.id], found[intent.id]
            free = [n for n in made if n not in held] if made is not None else None
            if free is None:
                await self._settle(intent, None, NOT_MATCHED)
            elif not free:
                await self._settle(intent, None, NOT_IN_HISTORY)
            elif len(free) > 1 or _contested(intent.id, req, free[0], everyone, lookup):
                await self._settle(intent, None, IN_HISTORY_TWICE)
            else:
                await self._settle(intent, free[0], IN_HISTORY_TWICE)

    async def _settle(self, intent: Record, native_id: str | None, error: str) -> None:
        """Writes what the lookup found for `intent`; a job found is driven here like one taken over."""
        job = await self.journal.settle_intent(intent, native_id, error)
        if job is None:
            log.warning("%s: its replica stopped before the provider answered the submit; the job may exist and "
                        "is reported as unknown (never resubmitted): %s", intent.id, error)
            return
        self.found += 1
        log.info("%s: the provider's history shows its job %s; took it over", intent.id, job.id)
        task = asyncio.get_running_loop().create_task(self._drive(job), name=f"flux-mcp-drive {job.id}")
        self.driving[job.id] = task

    async def _drive(self, record: Record) -> None:
        try:
            provider = self.providers.get(record.provider)
            if provider is None or not provider.configured:
                log.warning("%s: provider %s is not configured here; its lease is let go", record.id, record.provider)
                await self.journal.release(record.id)
                return
            await self.runner.drive(record, provider, self.paths)
        finally:
            self.driving.pop(record.id, None)

    async def _listen(self) -> None:
        """The one LISTEN connection: each notification wakes the waits on that job; reconnects when cut."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        # A URL that names its application (FLUX_MCP_LISTEN_DATABASE_URL, to find it in pg_stat_activity) keeps it.
        where = self.journal.conninfo
        with contextlib.suppress(psycopg.Error):  # an unreadable URL: connecting says what is wrong, below
            if "application_name" not in conninfo_to_dict(where):
                where = make_conninfo(where, application_name=self.listen_name)
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(where, autocommit=True)
            except Exception as exc:
                log.info("LISTEN connection not made (%s); retrying", _first_line(exc))
                await asyncio.sleep(REREAD)
                continue
            try:
                await conn.execute(f"LISTEN {CHANNEL}")
                self.listening.set()
                async for note in conn.notifies():
                    self.journal.waits.wake(note.payload)
            except Exception as exc:  # cut (a restart, a failover, pg_terminate_backend): waits re-read meanwhile
                log.info("LISTEN connection lost (%s); reconnecting", _first_line(exc))
            finally:
                self.listening.clear()
                with contextlib.suppress(Exception):
                    await conn.close()
            await asyncio.sleep(0.1)


def _asked(record: Record) -> JobRequest | None:
    """The request an intent's submit was built from, as journaled (None: it cannot be rebuilt)."""
    from pydantic import ValidationError

    from .request import JobRequest

    kept = {k: v for k, v in record.request.items() if k in JobRequest.model_fields and k not in _NOT_SENT}
    try:
        return JobRequest.model_validate({**kept, "kind": record.kind, "provider": record.provider,
                                          "model": record.model or None})
    except ValidationError:
        return None


_NOT_SENT = frozenset({"save_to", "overwrite", "wait_seconds", "dry_run", "max_cost_usd", "idempotency_key"})
"""Journaled fields that only the server acts on (the plan's `save_to` is a list there, not the argument)."""


def _created_by(lookup: SubmitLookup, req: JobRequest | None) -> list[str] | None:
    return None if req is None else lookup.created_by(req)


def _contested(intent_id: str, req: JobRequest | None, native_id: str, everyone: list[tuple[Record, JobRequest | None]],
               lookup: SubmitLookup) -> bool:
    """Whether a row other than `intent_id` could have made the job `native_id`: its request made it too, or its
    request cannot be matched and asks the same model and prompt (its body is not known to differ)."""
    for other, asked in everyone:
        if other.id == intent_id:
            continue
        made = _created_by(lookup, asked)
        if made is not None and native_id in made:
            return True
        if made is None and req is not None and other.model == req.model and other.request.get("prompt") == req.prompt:
            return True
    return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


__all__ = ["CAPACITY", "LEASE_SECONDS", "KeyTaken", "LeaseLost", "Leases", "Replica", "Waits", "replica_id"]
