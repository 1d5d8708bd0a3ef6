"""The durable record of every prediction: the `Journal` protocol and its SQLite implementation.

A job is written here right after the provider accepts it and before the server waits on it, and
every outcome is written when it is known, so `check_prediction` answers for any id this server
ever returned, also after a restart or a crash. No key or token is ever stored: requests are kept
as the server's own parameters, and the job runner scrubs provider text before it is recorded.

The protocol is async so that a networked store (PostgreSQL) can implement it; the SQLite store
answers from the event loop without ever blocking it:

* A write is tried at once with SQLite's busy timeout at zero, so a lock held by another process
  fails in microseconds instead of freezing the loop. A write that fails for any reason (locked,
  disk full, read-only) is kept in memory — the *backlog* — and retried by a background thread
  until it lands; `put` says whether it landed, so the result can say the job is not yet durable.
  `get` answers from the backlog first, so an unwritten job is still found.
* Reads that meet a lock are retried in a worker thread.
* The spend ledger (`charges`, one row per paid job) is written in transactions of its own: a
  reservation checks the sums and inserts its row in one `BEGIN IMMEDIATE` transaction, so two
  calls (in one process or several sharing the file) never both spend the last dollar.
* Failover steps that created nothing (a refusal, a request never sent) are rows of `attempts`, kept a
  day: "auto" reads the recent ones to put an unhealthy provider last, after a restart too.
* A data folder this process cannot write (a read-only mount, another user's folder) is opened read-only:
  `check_prediction` still answers from it, and `read_only()` says why new jobs are refused.
* The file carries a schema version (`PRAGMA user_version`). Older layouts are migrated; a journal
  from a newer flux-mcp (a higher version, a missing column, an unknown required column) is
  refused at start with one line naming the folder (`JournalUnusable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import anyio

from .errors import ConfigError
from .models import ImageOutput, PredictionResult, Status

if TYPE_CHECKING:
    from .money import Bill

log = logging.getLogger("flux_mcp.journal")

RECENT = 20
"""A model's typical duration is the median of its last this-many successful jobs."""
_RECENT_TTL = 60.0
"""Seconds the remembered durations are trusted before the file is read again."""
SCHEMA_VERSION = 7
"""The layout this code reads and writes (`PRAGMA user_version`)."""
ATTEMPT_RETENTION = 86_400.0
"""Seconds an attempt row is kept: it only informs the choice of provider in the next minutes."""
_RETRY_EVERY = 1.0
"""Seconds between the background thread's attempts to write the backlog."""
_CHECKPOINT_EVERY = 0.5
"""Seconds between the checkpointer's passes (see `_checkpoint_loop`)."""
_WAL_KEPT_BYTES = 4 * 1024 * 1024
_LOOP_CHECKPOINT_PAGES = 4_000
"""The WAL size (pages) at which a commit on the loop's connection checkpoints by itself (SQLite's default:
1,000). The checkpointer thread has copied nearly all of them by then, so this one only catches up: it is what
lets the WAL start over while writes never pause (a checkpoint beside the writes can never finish the last
pages, written meanwhile)."""
_SLOW_TIMEOUT = 10.0
"""Busy timeout (seconds) of the connections used off the event loop."""
DELIVERED_AFTER = 0.05
"""Seconds a delivered mark waits for others to be written with (see `SqliteJournal.mark_delivered`)."""

_COLUMNS = ("id", "provider", "native_id", "model", "kind", "status", "request", "images", "outputs", "error",
            "cost_usd", "remaining_credits", "created_at", "updated_at", "completed_at", "principal", "request_key",
            "idempotency_key", "delivered", "cost_estimated", "timed")

_MIGRATIONS: dict[int, str] = {
    # 0 -> 1: the first layout. Journals written before versions existed have exactly these tables.
    1: """
CREATE TABLE IF NOT EXISTS predictions (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    native_id TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]',
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    cost_usd REAL,
    remaining_credits REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    completed_at REAL
);
CREATE INDEX IF NOT EXISTS predictions_model ON predictions (provider, model, status, completed_at);
CREATE TABLE IF NOT EXISTS uploads (
    sha256 TEXT NOT NULL,
    provider TEXT NOT NULL,
    url TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (sha256, provider)
);
""",
    # 1 -> 2: who asked (the connection's principal), what exactly (a key of the normalised request), the
    # caller's idempotency key, and whether the answer reached the caller (a re-issued call joins a job whose
    # answer never did).
    2: """
ALTER TABLE predictions ADD COLUMN principal TEXT NOT NULL DEFAULT 'local';
ALTER TABLE predictions ADD COLUMN request_key TEXT;
ALTER TABLE predictions ADD COLUMN idempotency_key TEXT;
ALTER TABLE predictions ADD COLUMN delivered INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS predictions_rejoin ON predictions (principal, request_key, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS predictions_idempotency ON predictions (principal, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
""",
    # 2 -> 3: whether a cost is the provider's own figure or the price table's; and the spend ledger, one row
    # per paid job (reserved at submit, billed once created, "unknown" when it may have started), summed
    # against the budgets.
    3: """
ALTER TABLE predictions ADD COLUMN cost_estimated INTEGER NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS charges (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    usd REAL,
    estimated INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL,
    prediction_id TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS charges_when ON charges (principal, created_at);
CREATE INDEX IF NOT EXISTS charges_prediction ON charges (prediction_id);
""",
    # 3 -> 4: history listings (newest first, one page at a time), for one caller and for everyone (the
    # person at the terminal sees the whole journal).
    4: """
CREATE INDEX IF NOT EXISTS predictions_history ON predictions (principal, created_at, id);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created_at, id);
""",
    # 4 -> 5: failover attempts that created nothing (refused, or never sent), one row each: they leave no
    # prediction, and "auto" reads recent ones to put an unhealthy provider last (across restarts and servers).
    5: """
CREATE TABLE IF NOT EXISTS attempts (
    principal TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_at ON attempts (at, provider);
""",
    # 5 -> 6: the rejoin lookup reads only jobs whose answer never reached the caller. The old index held every
    # job, so a caller who repeats one request often (the same prompt for variations) scanned all of the
    # window's delivered jobs on each call; this one holds the undelivered only (a job leaves it when its
    # answer is delivered), and the id, so the lookup never reads the table for the jobs it skips.
    6: """
DROP INDEX IF EXISTS predictions_rejoin;
CREATE INDEX IF NOT EXISTS predictions_open ON predictions (principal, request_key, created_at, id)
    WHERE delivered = 0;
""",
    # 6 -> 7: whether a job's completion moment measures its duration (see `Record.timed`); the jobs recorded
    # before did (every job of a learned model looked early then).
    7: """
ALTER TABLE predictions ADD COLUMN timed INTEGER NOT NULL DEFAULT 1;
""",
}


def typical(durations: list[float]) -> float | None:
    """A model's typical duration: the median of its recent ones, from two on (None: not known yet)."""
    return statistics.median(durations) if len(durations) >= 2 else None


class JournalUnusable(ConfigError):
    """The journal cannot be opened: from a newer flux-mcp, not a database, or the folder is unusable."""


@dataclass
class Record:
    """One prediction as the journal holds it."""

    id: str
    provider: str
    native_id: str
    model: str
    kind: str
    status: Status
    request: dict[str, Any]
    """The job's request as `JobRequest.journaled()` gives it, plus `save_to` targets and notes."""
    images: list[ImageOutput] = field(default_factory=list)
    outputs: list[str | None] = field(default_factory=list)
    """The provider's output URLs (None for inline outputs), kept to re-download after a failure."""
    error: str | None = None
    cost_usd: float | None = None
    remaining_credits: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    completed_at: float | None = None
    principal: str = "local"
    """Who asked: the local user (stdio, terminal) or the authenticated identity over HTTP."""
    request_key: str | None = None
    """A digest of the normalised request: an identical re-issued call from the same principal joins this job."""
    idempotency_key: str | None = None
    """The caller's own key: the same key from the same principal always returns this job."""
    delivered: bool = False
    """Whether a finished answer for this job reached the caller."""
    cost_estimated: bool = False
    """`cost_usd` comes from the price table, not from the provider."""
    timed: bool = True
    """Whether `completed_at` measures the job's duration, so the model's typical duration is learned from it:
    the status checks bracketed its end (one saw it running, the next done) or looked early on purpose. A job
    found done by the first check, made when it was expected to be done, only says it took no longer."""

    def result(self) -> PredictionResult:
        return PredictionResult(
            prediction_id=self.id, provider=self.provider, model=self.model, status=self.status,
            images=self.images, error=self.error, cost_usd=self.cost_usd,
            cost_estimated=self.cost_estimated and self.cost_usd is not None,
            remaining_credits=self.remaining_credits, selection_reason=self.request.get("selection_reason"),
        )

    def copy(self) -> Record:
        return dataclasses.replace(self, request=dict(self.request), images=list(self.images),
                                   outputs=list(self.outputs))


ChargeState = Literal["reserved", "billed", "unknown"]
"""`reserved`: the submit is on its way; `billed`: the provider created the job; `unknown`: the submit may have
created a job, and nothing can prove it did not."""


@dataclass
class Charge:
    """One paid job in the spend ledger. A job refused before creation leaves no row."""

    id: str
    principal: str
    provider: str
    model: str
    images: int
    usd: float | None
    """The estimate until the job ends, then its cost (the provider's figure when it gave one); None: unpriced."""
    estimated: bool = True
    state: ChargeState = "reserved"
    prediction_id: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Totals:
    """What one principal's (or everyone's) charges since some moment add up to."""

    usd: float = 0.0
    """Priced charges only."""
    images: int = 0


AttemptKind = Literal["bad_key", "no_credit", "rate_limited", "unreachable", "refused", "unsuitable"]
"""Why an attempt created nothing: the provider refused the key, the credit, the rate or the request itself
(`refused`), the request never reached it (`unreachable`), or the step did not take the call's arguments
(`unsuitable`: decided here, before sending; says nothing about the provider's health)."""
HEALTH_KINDS: tuple[AttemptKind, ...] = ("bad_key", "no_credit", "rate_limited", "unreachable")
"""The kinds that count against a provider when "auto" orders them: the provider's own state. A request the
provider refused for its content (`refused`: a blocked prompt, a size it does not take) says nothing about
how it would serve the next caller."""


@dataclass(frozen=True)
class Attempt:
    """One failover step that created nothing: no job, no charge; only this row says it happened."""

    principal: str
    provider: str
    model: str
    kind: AttemptKind
    reason: str
    """A short, scrubbed text (never a key): what the provider said, or why the step was skipped."""
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Refusals:
    """A provider's attempts of the health kinds since some moment."""

    count: int
    last_at: float
    last_kind: str
    last_reason: str


R = TypeVar("R")

EVERYONE = "all:"
"""`Journal.reserve` hands its check the whole ledger's totals too, each under this prefix and the window's name
(`all:day`): the budgets hold the server as a whole as well as each principal."""


class LedgerUnavailable(ConfigError):
    """The spend ledger could not be read or written (the journal is read-only, full or locked too long)."""


class Journal(Protocol):
    """Where predictions (and upload URLs) are kept. Every method may be called from the event loop."""

    async def put(self, record: Record, bill: Bill | None = None, *, settle: bool = False) -> bool:
        """Records `record` (insert or replace). Never raises for a storage failure: returns False when
        the write could not land yet; the journal keeps it and retries, and `get` already returns it.
        `bill`: the call's reservation becomes the job's charge in the same write (kept and retried with it).
        `settle`: the job ended with the provider's own figure for its cost; its charge becomes that figure
        (`settle_charge`), with the record where the journal can."""
        ...

    async def get(self, prediction_id: str) -> Record | None: ...

    async def typical_duration(self, provider: str, model: str) -> float | None:
        """Median seconds from submit to completion of the model's recent successful jobs (None: unknown)."""
        ...

    async def recent_durations(self, provider: str, model: str) -> list[float]:
        """Seconds from submit to completion of the model's last `RECENT` successful jobs that measured theirs
        (`Record.timed`), newest first: what `typical_duration` is the median of, once there are two."""
        ...

    async def upload_url(self, sha256: str, provider: str, max_age: float) -> str | None: ...

    async def add_upload(self, sha256: str, provider: str, url: str) -> None: ...

    def unwritten(self) -> list[str]:
        """Ids of records not yet on stable storage."""
        ...

    async def rejoinable(self, principal: str, request_key: str, since: float) -> list[Record]:
        """Jobs of `principal` for this request since `since` whose answer never reached the caller, newest first."""
        ...

    async def by_idempotency_key(self, principal: str, key: str) -> Record | None:
        """The job `principal` started with this idempotency key, if the journal holds it."""
        ...

    async def mark_delivered(self, prediction_id: str) -> None:
        """Records that an answer for this job reached its caller (a later identical call is a new job)."""
        ...

    async def finished_before(self, before: float, limit: int) -> list[Record]:
        """Up to `limit` final (succeeded, failed, canceled) records last updated before `before`, oldest first."""
        ...

    async def remove(self, prediction_ids: list[str], uploads_before: float | None = None) -> int:
        """Deletes these records (and cached upload URLs older than `uploads_before`); returns how many went."""
        ...

    async def search(self, *, principal: str | None, query: str | None, provider: str | None, status: str | None,
                     since: float | None, limit: int, before: tuple[float, str] | None) -> list[Record]:
        """Up to `limit` records, newest first (by `created_at`, then id), that match every filter given:
        `principal` (None: everyone's), `query` (each of its words appears in the prompt, in any case),
        `provider`, `status` (a status, or "pending" for starting and processing), `since` (created at or
        after, epoch seconds). `before` is the (created_at, id) of the last record of the previous page."""
        ...

    async def close(self) -> None:
        """Writes what it can of the backlog and releases the store."""
        ...

    # --- failover attempts ------------------------------------------------------------------------

    async def add_attempt(self, attempt: Attempt) -> bool:
        """Records an attempt that created nothing (and drops rows older than ATTEMPT_RETENTION). Never raises:
        returns False when it could not be written (it only informs later choices)."""
        ...

    async def refusals_since(self, since: float) -> dict[str, Refusals]:
        """Per provider, its attempts of the HEALTH_KINDS at or after `since` (providers without any are absent)."""
        ...

    async def remove_attempts(self, before: float, *, dry_run: bool = False) -> int:
        """Deletes attempts made before `before` (a dry run only counts them); returns how many."""
        ...

    def read_only(self) -> str | None:
        """None, or one line saying why nothing can be written (new jobs are refused; old ones can be checked)."""
        ...

    # --- the spend ledger -------------------------------------------------------------------------
    # Writes raise LedgerUnavailable when they cannot land (the caller decides: a budget fails closed).

    async def reserve(self, charge: Charge, since: Mapping[str, float],
                      check: Callable[[Mapping[str, Totals]], R | None] | None) -> R | None:
        """Atomically: totals `charge.principal`'s charges created at or after each moment of `since`, and every
        principal's (by the same names, prefixed with EVERYONE), calls `check` with them, and records `charge`
        unless `check` returned a refusal, which is returned. No other reservation, of any principal, can land
        between the sums and the insert. With no `check` (no limit to keep) the charge is simply recorded."""
        ...

    async def totals(self, principal: str | None, since: Mapping[str, float]) -> dict[str, Totals]:
        """The principal's totals since each moment (None: every principal's; a reading: nothing is reserved)."""
        ...

    async def update_charge(self, charge_id: str, state: ChargeState, prediction_id: str | None = None, *,
                            usd: float | None = None) -> None:
        """The charge's new state (and job id); `usd`, when given, is the provider's own figure for the cost
        of a job that has already ended (written with the state, in one write)."""
        ...

    async def release_charge(self, charge_id: str) -> None:
        """Deletes a reservation whose job was provably never created."""
        ...

    async def settle_charge(self, prediction_id: str, usd: float | None, estimated: bool) -> None:
        """The job ended: its charge becomes its cost (`usd` None keeps the estimate)."""
        ...

    async def charges_since(self, since: float) -> list[Charge]:
        """Every charge created at or after `since`, oldest first."""
        ...


def _row(rec: Record) -> tuple[Any, ...]:
    return (rec.id, rec.provider, rec.native_id, rec.model, rec.kind, rec.status, json.dumps(rec.request),
            json.dumps([i.model_dump() for i in rec.images]), json.dumps(rec.outputs), rec.error, rec.cost_usd,
            rec.remaining_credits, rec.created_at, rec.updated_at, rec.completed_at, rec.principal, rec.request_key,
            rec.idempotency_key, int(rec.delivered), int(rec.cost_estimated), int(rec.timed))


def _record(row: tuple[Any, ...]) -> Record:
    return Record(
        id=row[0], provider=row[1], native_id=row[2], model=row[3], kind=row[4], status=row[5],
        request=json.loads(row[6]), images=[ImageOutput(**i) for i in json.loads(row[7])],
        outputs=json.loads(row[8]), error=row[9], cost_usd=row[10], remaining_credits=row[11],
        created_at=row[12], updated_at=row[13], completed_at=row[14], principal=row[15], request_key=row[16],
        idempotency_key=row[17], delivered=bool(row[18]), cost_estimated=bool(row[19]), timed=bool(row[20]),
    )


_CHARGE_COLUMNS = ("id", "principal", "provider", "model", "images", "usd", "estimated", "state", "prediction_id",
                   "created_at", "updated_at")
_INSERT_CHARGE = f"INSERT INTO charges ({', '.join(_CHARGE_COLUMNS)}) VALUES ({','.join('?' * len(_CHARGE_COLUMNS))})"
_SUM_CHARGES = "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(images), 0) FROM charges WHERE principal=? AND created_at>=?"
_SUM_ALL = "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(images), 0) FROM charges WHERE created_at>=?"


def _charge_row(c: Charge) -> tuple[Any, ...]:
    return (c.id, c.principal, c.provider, c.model, c.images, c.usd, int(c.estimated), c.state, c.prediction_id,
            c.created_at, c.updated_at)


def _charge(row: tuple[Any, ...]) -> Charge:
    return Charge(id=row[0], principal=row[1], provider=row[2], model=row[3], images=row[4], usd=row[5],
                  estimated=bool(row[6]), state=row[7], prediction_id=row[8], created_at=row[9], updated_at=row[10])


def _totals(db: sqlite3.Connection, principal: str, since: Mapping[str, float]) -> dict[str, Totals]:
    """The principal's totals, and everyone's under EVERYONE-prefixed names (see `Journal.reserve`)."""
    out: dict[str, Totals] = {}
    for name, start in since.items():
        usd, images = db.execute(_SUM_CHARGES, (principal, start)).fetchone()
        out[name] = Totals(float(usd), int(images))
        usd, images = db.execute(_SUM_ALL, (start,)).fetchone()
        out[EVERYONE + name] = Totals(float(usd), int(images))
    return out


def _locked(exc: sqlite3.Error) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


_SETTLE_CHARGE = "UPDATE charges SET usd=COALESCE(?, usd), estimated=COALESCE(?, estimated), updated_at=? WHERE " \
    "prediction_id=?"
_UPDATE_CHARGE = ("UPDATE charges SET state=?, prediction_id=COALESCE(?, prediction_id), usd=COALESCE(?, usd), "
                  "estimated=CASE WHEN ? IS NULL THEN estimated ELSE 0 END, updated_at=? WHERE id=?")


def _write_record(db: sqlite3.Connection, row: tuple[Any, ...], bill: Bill | None,
                  cost: tuple[float, str] | None = None) -> None:
    """One record's upsert, with its charge billed (`bill`) or given the provider's figure (`cost`: USD and the
    prediction id) in the same transaction."""
    if bill is None and cost is None:
        db.execute(_upsert(row), row)
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(_upsert(row), row)
        if bill is not None and bill.charge is not None:  # never written before: inserted, billed
            db.execute("INSERT OR REPLACE" + _INSERT_CHARGE.removeprefix("INSERT"), _charge_row(bill.charge))
        elif bill is not None:
            db.execute(_UPDATE_CHARGE, ("billed", bill.prediction_id, bill.usd, bill.usd, time.time(),
                                        bill.charge_id))
        if cost is not None:
            db.execute(_SETTLE_CHARGE, (cost[0], 0, time.time(), cost[1]))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise


_FIXED = frozenset({"id", "provider", "model", "kind", "created_at", "principal", "request_key", "idempotency_key"})
"""Columns a record never changes after its first write."""

_UPSERT = (f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({','.join('?' * len(_COLUMNS))})"
           " ON CONFLICT(id) DO UPDATE SET "
           f"{', '.join(f'{c}=excluded.{c}' for c in _COLUMNS if c not in _FIXED and c != 'delivered')}")
_UPSERT_DELIVERED = _UPSERT + ", delivered=1"
"""The upserts of a record (not yet / already delivered). A later write leaves the columns a record never
changes alone, and `delivered` too unless it is now set: SQLite rewrites an index entry only when the SET
list names one of the index's columns (or of its WHERE), so the history, rejoin and idempotency indexes are
written once, with the row, and `delivered` only ever goes from 0 to 1 (a late write of an older copy
cannot undo it)."""
_DELIVERED = _COLUMNS.index("delivered")


def _upsert(row: tuple[Any, ...]) -> str:
    return _UPSERT_DELIVERED if row[_DELIVERED] else _UPSERT


def _fold(text: str | None) -> str:
    return text.casefold() if isinstance(text, str) else ""


_PENDING_STATUSES = ("starting", "processing")


@dataclass(frozen=True)
class Search:
    """The filters of `Journal.search`, as SQL for a store that speaks it and as a test of one record."""

    principal: str | None = None
    words: tuple[str, ...] = ()
    provider: str | None = None
    statuses: tuple[str, ...] = ()
    since: float | None = None
    before: tuple[float, str] | None = None

    @classmethod
    def of(cls, *, principal: str | None, query: str | None, provider: str | None, status: str | None,
           since: float | None, before: tuple[float, str] | None) -> Search:
        statuses = _PENDING_STATUSES if status == "pending" else (status,) if status else ()
        return cls(principal=principal, words=tuple(_fold(query).split()), provider=provider or None,
                   statuses=statuses, since=since, before=before)

    def sql(self, limit: int) -> tuple[str, tuple[Any, ...]]:
        """The SELECT (SQLite dialect; the prompt is folded by a `flux_fold` function on the connection)."""
        where: list[str] = []
        args: list[Any] = []
        if self.principal is not None:
            where.append("principal = ?")
            args.append(self.principal)
        if self.provider:
            where.append("provider = ?")
            args.append(self.provider)
        if self.statuses:
            where.append(f"status IN ({','.join('?' * len(self.statuses))})")
            args.extend(self.statuses)
        if self.since is not None:
            where.append("created_at >= ?")
            args.append(self.since)
        if self.before is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args.extend((self.before[0], self.before[0], self.before[1]))
        for word in self.words:
            where.append("instr(flux_fold(json_extract(request, '$.prompt')), ?) > 0")
            args.append(word)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return (f"SELECT {', '.join(_COLUMNS)} FROM predictions{clause} ORDER BY created_at DESC, id DESC LIMIT ?",
                (*args, max(limit, 0)))

    def matches(self, rec: Record) -> bool:
        prompt = _fold(str(rec.request.get("prompt", "")))
        return ((self.principal is None or rec.principal == self.principal)
                and (not self.provider or rec.provider == self.provider)
                and (not self.statuses or rec.status in self.statuses)
                and (self.since is None or rec.created_at >= self.since)
                and (self.before is None or (rec.created_at, rec.id) < self.before)
                and all(word in prompt for word in self.words))


_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM predictions WHERE id=?"
_SELECT_MANY = f"SELECT {', '.join(_COLUMNS)} FROM predictions WHERE id IN "


def _wal(db: sqlite3.Connection, patience: float = _SLOW_TIMEOUT) -> None:
    """Puts the file in WAL mode. Switching needs the file to itself, and SQLite answers "locked" at once
    (no busy wait) while another server starting on the same folder holds it: try again for a while."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)  # start-up only: another process is switching the same file


def _connect(path: Path, *, timeout: float) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=timeout)
    db.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return db


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """The journal of a folder this process cannot write. SQLite reads a WAL-mode file read-only (`mode=ro`)
    only while its `-shm` index exists; after a clean close it is gone and cannot be made here, so the file
    is opened `immutable` — exact then, as every committed write is in the file itself. A non-empty `-wal`
    left beside it holds writes that only a writable folder lets SQLite read: refused, not half-read."""
    if not path.is_file():
        raise JournalUnusable(f"The data folder {path.parent} is read-only and holds no journal. Set FLUX_MCP_HOME "
                              "to a writable folder.")
    uri = path.resolve().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA user_version").fetchone()
        return db
    except sqlite3.OperationalError:
        db.close()
    wal = path.with_name(path.name + "-wal")
    with contextlib.suppress(OSError):
        if wal.stat().st_size > 0:
            raise JournalUnusable(
                f"The journal in the read-only data folder {path.parent} cannot be read: its latest writes are "
                f"still in {wal.name}, which SQLite reads only where it may write. Make the folder writable once "
                "(any flux-mcp start folds them in), or set FLUX_MCP_HOME to a writable copy.")
    return sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False, isolation_level=None)


def _read_only_note(folder: Path) -> str:
    return (f"The data folder {folder} (FLUX_MCP_HOME) is read-only: earlier jobs are answered from its journal, "
            "new jobs are refused. Make it writable, or set FLUX_MCP_HOME to a writable folder, to start new ones.")


class SqliteJournal:
    """The journal in one SQLite file (WAL mode, `synchronous=NORMAL`: a killed process loses nothing
    it committed). Several processes may share the file."""

    bills_with_record = True
    """A charge may be written first with its job's id, billed (`put` with a `Bill` carrying it)."""

    def __init__(self, path: Path):
        self.path = path
        self._where = path.parent
        self._read_only: str | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if os.access(path.parent, os.W_OK):
                self._db = _connect(path, timeout=_SLOW_TIMEOUT)
            else:
                self._db = _connect_read_only(path)
                self._read_only = _read_only_note(path.parent)
            self._opened_read_only = self._read_only is not None
            self._prepare()
        except sqlite3.DatabaseError as exc:
            raise JournalUnusable(f"The journal {path} cannot be used ({exc}). Move it away or set FLUX_MCP_HOME "
                                  "to another folder.") from None
        except OSError as exc:
            raise JournalUnusable(f"The data folder {path.parent} cannot be used ({exc.strerror or exc}). Set "
                                  "FLUX_MCP_HOME to a writable folder.") from None
        self._db.execute("PRAGMA busy_timeout=0")  # from here on, the loop's connection never waits on a lock
        self._checkpointer: threading.Thread | None = None
        self._lock = threading.Lock()
        self._recent: dict[tuple[str, str], tuple[float, list[tuple[str, float]]]] = {}
        """(provider, model) -> (when read, [(prediction id, duration)] newest first)."""
        self._backlog: dict[str, Record] = {}
        """Records whose latest version has not landed yet, by id (guarded by `_lock`)."""
        self._backlog_reason: str | None = None
        self._bills: dict[str, Bill] = {}
        """The charges to bill with a backlog record's write, by its id (guarded by `_lock`)."""
        self._retrier: threading.Thread | None = None
        self._closed = threading.Event()
        self._delivered: set[str] = set()
        """Jobs whose answer reached the caller, not yet marked in the file (guarded by `_lock`): written
        together, DELIVERED_AFTER seconds after the first (see `mark_delivered`)."""
        self._delivering: asyncio.TimerHandle | None = None

    def _prepare(self) -> None:
        """Sets WAL mode, migrates an older layout, refuses one it does not understand."""
        db = self._db
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise JournalUnusable(
                f"The journal in {self._where} was written by a newer flux-mcp (schema {version}; this one reads "
                f"{SCHEMA_VERSION}). Upgrade flux-mcp, or set FLUX_MCP_HOME to another folder.")
        try:
            if self._read_only is None:  # a read-only folder's journal is read as it is: no WAL switch, no migration
                _wal(db)
                db.execute("PRAGMA synchronous=NORMAL")
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    self._migrate(step)
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) and "read-only" not in str(exc):
                raise
            self._read_only = _read_only_note(self._where)
        if self._read_only is not None:
            log.debug("the journal %s is opened read-only", self.path)
        self._check_layout()
        if self._read_only is None:
            with contextlib.suppress(OSError):
                self.path.chmod(0o600)

    def _migrate(self, step: int) -> None:
        """Applies one migration in a write transaction, re-reading the version inside it: several servers
        starting at once on one folder migrate it once."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if int(db.execute("PRAGMA user_version").fetchone()[0]) < step:
                for statement in filter(str.strip, _MIGRATIONS[step].split(";")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={step}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _check_layout(self) -> None:
        """A layout this code cannot write (a column it needs is gone, or one it does not know is required)
        would make every write fail after a paid submit: refuse it at start instead."""
        columns = {row[1]: row for row in self._db.execute("PRAGMA table_info(predictions)").fetchall()}
        missing = [c for c in _COLUMNS if c not in columns]
        unknown = [name for name, row in columns.items()
                   if name not in _COLUMNS and row[3] and row[4] is None]  # NOT NULL without a default
        if missing or unknown:
            what = (f"lacks column(s) {', '.join(missing)}" if missing else
                    f"requires column(s) {', '.join(unknown)} this version does not know")
            raise JournalUnusable(
                f"The journal in {self._where} {what}: it was written by another flux-mcp version. Upgrade "
                "flux-mcp, or set FLUX_MCP_HOME to another folder.")

    # --- writes -------------------------------------------------------------------------------

    async def put(self, record: Record, bill: Bill | None = None, *, settle: bool = False) -> bool:
        self._remember_duration(record)
        row = _row(record)
        cost = (record.cost_usd, record.id) if settle and record.cost_usd is not None else None
        with self._lock:
            if record.id not in self._backlog and not self._backlog:
                try:
                    _write_record(self._db, row, bill, cost)
                    self._wrote()
                    return True
                except sqlite3.Error as exc:
                    reason = str(exc)
                else:  # pragma: no cover - unreachable
                    return True
            else:
                reason = self._backlog_reason or "earlier writes are still waiting"
            # Later writes queue behind unwritten ones, so a record's versions land in order.
            if bill is not None:
                self._bills[record.id] = bill
            self._backlog[record.id] = record.copy()
            self._backlog_reason = reason
            self._start_retrier()
        log.warning("journal write of %s did not land (%s); kept in memory and retried", record.id, reason)
        if cost is not None:  # the ledger's own write, as it would have been without the record
            try:
                await self.settle_charge(record.id, cost[0], estimated=False)
            except LedgerUnavailable as exc:
                log.warning("the cost of %s was not written to the ledger (its estimate stays): %s", record.id, exc)
        return False

    def unwritten(self) -> list[str]:
        with self._lock:
            return list(self._backlog)

    def _wrote(self) -> None:
        """After a write on the loop's connection: the checkpointer runs from the first one on. SQLite would
        otherwise checkpoint inside a commit every 1,000 WAL pages (copying them into the file and two fsyncs:
        milliseconds on the loop, every ~70 jobs); the thread copies them beside the loop, and a commit only
        catches up now and then (see _LOOP_CHECKPOINT_PAGES). A process that only reads never starts it."""
        if self._checkpointer is None and self._read_only is None:
            self._db.execute(f"PRAGMA wal_autocheckpoint={_LOOP_CHECKPOINT_PAGES}")
            self._db.execute(f"PRAGMA journal_size_limit={_WAL_KEPT_BYTES}")  # the WAL shrinks back when it starts over
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="flux-mcp-checkpoint",
                                                  daemon=True)
            self._checkpointer.start()

    def _checkpoint_loop(self) -> None:
        """Copies committed WAL pages into the file every _CHECKPOINT_EVERY seconds, on a connection of its own
        (PASSIVE: it never waits on a reader or a writer, and a pass with nothing new costs a lookup)."""
        db: sqlite3.Connection | None = None
        try:
            while not self._closed.wait(_CHECKPOINT_EVERY):
                db = db or _connect(self.path, timeout=_SLOW_TIMEOUT)
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.info("journal checkpoints are back on the commits (the checkpointer stopped: %s)", exc)
            with self._lock, contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_autocheckpoint=1000")
        finally:
            if db is not None:
                db.close()

    def _start_retrier(self) -> None:
        if self._retrier is None or not self._retrier.is_alive():
            self._retrier = threading.Thread(target=self._retry_backlog, name="flux-mcp-journal", daemon=True)
            self._retrier.start()

    def _retry_backlog(self) -> None:
        """Writes the backlog on a connection of its own that may wait on locks, until it is empty."""
        db: sqlite3.Connection | None = None
        try:
            while not self._closed.wait(_RETRY_EVERY):  # the write just failed: give the cause a moment
                if self._flush_backlog(db := db or _connect(self.path, timeout=_SLOW_TIMEOUT)):
                    return
        except sqlite3.Error as exc:
            log.warning("journal retry stopped: %s", exc)
        finally:
            if db is not None:
                db.close()

    def _flush_backlog(self, db: sqlite3.Connection) -> bool:
        """One attempt at every unwritten record; True when none is left."""
        with self._lock:
            pending = list(self._backlog.values())
        for rec in pending:
            with self._lock:
                bill = self._bills.get(rec.id)
            try:
                _write_record(db, _row(rec), bill)
            except sqlite3.Error as exc:
                with self._lock:
                    self._backlog_reason = str(exc)
                return False
            with self._lock:
                if self._bills.get(rec.id) is bill:
                    self._bills.pop(rec.id, None)
                if self._backlog.get(rec.id) is rec:
                    del self._backlog[rec.id]
                    log.info("journal write of %s landed", rec.id)
        with self._lock:
            return not self._backlog

    async def add_upload(self, sha256: str, provider: str, url: str) -> None:
        try:
            with self._lock:
                self._db.execute("INSERT OR REPLACE INTO uploads (sha256, provider, url, created_at) VALUES (?,?,?,?)",
                                 (sha256, provider, url, time.time()))
        except sqlite3.Error as exc:  # a cache: losing it costs one more (free) upload later
            log.info("upload URL not recorded: %s", exc)

    # --- reads --------------------------------------------------------------------------------

    async def _read(self, sql: str, args: tuple[Any, ...], many: bool = False) -> Any:
        """Runs a query on the loop's connection; if it meets a lock, again in a thread that may wait."""
        try:
            with self._lock:
                cur = self._db.execute(sql, args)
                return cur.fetchall() if many else cur.fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise

        def slow() -> Any:
            db = self._reader()
            try:
                cur = db.execute(sql, args)
                return cur.fetchall() if many else cur.fetchone()
            finally:
                db.close()

        return await anyio.to_thread.run_sync(slow)

    async def get(self, prediction_id: str) -> Record | None:
        with self._lock:
            pending = self._backlog.get(prediction_id)
        if pending is not None:
            return pending.copy()
        row = await self._read(_SELECT, (prediction_id,))
        if row is None:
            return None
        rec = _record(row)
        with self._lock:
            rec.delivered = rec.delivered or rec.id in self._delivered  # marked, not yet written
        return rec

    async def typical_duration(self, provider: str, model: str) -> float | None:
        return typical(await self.recent_durations(provider, model))

    async def recent_durations(self, provider: str, model: str) -> list[float]:
        """The durations are read once and then kept up to date as this journal records finished jobs
        (re-read after a minute, for jobs that other processes sharing the file finished)."""
        key = (provider, model)
        cached = self._recent.get(key)
        if cached is None or time.monotonic() - cached[0] >= _RECENT_TTL:
            try:
                rows = await self._read(
                    "SELECT id, completed_at - created_at FROM predictions WHERE provider=? AND model=? AND"
                    " status='succeeded' AND completed_at IS NOT NULL AND timed=1 ORDER BY completed_at DESC"
                    " LIMIT ?", (provider, model, RECENT), many=True)
            except sqlite3.Error as exc:
                log.info("durations not read: %s", exc)
                rows = []
            cached = (time.monotonic(), [(r[0], r[1]) for r in rows if r[1] is not None and r[1] >= 0])
            self._recent[key] = cached
        return [d for _, d in cached[1]]

    def _remember_duration(self, rec: Record) -> None:
        """Adds a newly finished job's duration to the remembered ones (once, however often it is written)."""
        if (rec.status != "succeeded" or not rec.timed or rec.completed_at is None
                or rec.completed_at < rec.created_at):
            return
        cached = self._recent.get((rec.provider, rec.model))
        if cached is not None and all(rid != rec.id for rid, _ in cached[1]):
            cached[1].insert(0, (rec.id, rec.completed_at - rec.created_at))
            del cached[1][RECENT:]

    async def upload_url(self, sha256: str, provider: str, max_age: float) -> str | None:
        try:
            row = await self._read("SELECT url, created_at FROM uploads WHERE sha256=? AND provider=?",
                                   (sha256, provider))
        except sqlite3.Error:
            return None
        if row and time.time() - row[1] < max_age:
            return str(row[0])
        return None

    async def rejoinable(self, principal: str, request_key: str, since: float) -> list[Record]:
        with self._lock:
            pending = [r.copy() for r in self._backlog.values() if r.principal == principal
                       and r.request_key == request_key and not r.delivered and r.created_at >= since]
            delivered = set(self._delivered)  # marked, not yet written: as good as delivered=1
        # The ids first: most calls find none, or only jobs just answered here (their marks not written yet),
        # and reading whole rows to drop them cost a call more than the rest of its journal traffic.
        ids = await self._read(
            "SELECT id FROM predictions WHERE principal=? AND request_key=? AND delivered=0 AND created_at >= ?"
            " ORDER BY created_at DESC LIMIT ?", (principal, request_key, since, 5 + len(delivered)), many=True)
        wanted = [i for (i,) in ids if i not in delivered]
        rows = await self._read(f"{_SELECT_MANY}({','.join('?' * len(wanted))})", tuple(wanted),
                                many=True) if wanted else []
        found = {r.id: r for r in [*(_record(row) for row in rows), *pending] if r.id not in delivered}
        return sorted(found.values(), key=lambda r: r.created_at, reverse=True)

    async def by_idempotency_key(self, principal: str, key: str) -> Record | None:
        with self._lock:
            pending = next((r.copy() for r in self._backlog.values()
                            if r.principal == principal and r.idempotency_key == key), None)
        if pending is not None:
            return pending
        row = await self._read(f"SELECT {', '.join(_COLUMNS)} FROM predictions WHERE principal=? AND"
                               " idempotency_key=?", (principal, key))
        return None if row is None else _record(row)

    async def mark_delivered(self, prediction_id: str) -> None:
        """Noted at once for this process (`rejoinable` leaves the job out from here on) and written to the
        file with the other marks of the next DELIVERED_AFTER seconds in one statement: one write per answer
        would be the costliest step of a call. Until it lands, only another process sharing the file could
        still join the job: the safe side (a join pays nothing), and the window is that short."""
        if self._read_only is not None:  # nothing to join later: no new job can be started here
            return
        with self._lock:
            pending = self._backlog.get(prediction_id)
            if pending is not None:
                pending.delivered = True
                return
            self._delivered.add(prediction_id)
            if self._delivering is None:
                self._delivering = asyncio.get_running_loop().call_later(DELIVERED_AFTER, self._write_delivered)

    def _write_delivered(self) -> None:
        with self._lock:
            ids, self._delivered, self._delivering = sorted(self._delivered), set(), None
            if not ids:
                return
            try:
                for at in range(0, len(ids), 500):  # within SQLite's limit on bound parameters
                    chunk = ids[at:at + 500]
                    self._db.execute(f"UPDATE predictions SET delivered=1 WHERE id IN ({','.join('?' * len(chunk))})",
                                     chunk)
            except sqlite3.Error as exc:  # losing it only means a later identical call may join these jobs
                log.info("delivery of %d job(s) not recorded: %s", len(ids), exc)

    async def finished_before(self, before: float, limit: int) -> list[Record]:
        rows = await self._read(
            f"SELECT {', '.join(_COLUMNS)} FROM predictions WHERE status IN ('succeeded', 'failed', 'canceled')"
            " AND updated_at < ? ORDER BY updated_at LIMIT ?", (before, limit), many=True)
        return [_record(row) for row in rows]

    async def remove(self, prediction_ids: list[str], uploads_before: float | None = None) -> int:
        with self._lock:
            cur = self._db.executemany("DELETE FROM predictions WHERE id=? AND status IN ('succeeded', 'failed',"
                                       " 'canceled')", [(i,) for i in prediction_ids])
            removed = cur.rowcount
            if uploads_before is not None:
                self._db.execute("DELETE FROM uploads WHERE created_at < ?", (uploads_before,))
        return removed

    # --- the spend ledger ---------------------------------------------------------------------

    async def _write(self, work: Callable[[sqlite3.Connection], R]) -> R:
        """Runs `work` (its own transaction) on the loop's connection; if another process holds the write
        lock, again in a worker thread on a connection that waits for it. Raises LedgerUnavailable."""
        try:
            try:
                with self._lock:
                    return work(self._db)
            except sqlite3.OperationalError as exc:
                if not _locked(exc):
                    raise

            def slow() -> R:
                db = _connect(self.path, timeout=_SLOW_TIMEOUT)
                try:
                    return work(db)
                finally:
                    db.close()

            return await anyio.to_thread.run_sync(slow)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"The spend ledger in {self._where} cannot be written ({exc}).") from None

    async def reserve(self, charge: Charge, since: Mapping[str, float],
                      check: Callable[[Mapping[str, Totals]], R | None] | None) -> R | None:
        if check is None:
            await self._write(lambda db: db.execute(_INSERT_CHARGE, _charge_row(charge)))
            return None

        def work(db: sqlite3.Connection) -> R | None:
            db.execute("BEGIN IMMEDIATE")  # the write lock first: no other reservation between sum and insert
            try:
                refusal = check(_totals(db, charge.principal, since))
                if refusal is None:
                    db.execute(_INSERT_CHARGE, _charge_row(charge))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return refusal

        return await self._write(work)

    async def totals(self, principal: str | None, since: Mapping[str, float]) -> dict[str, Totals]:
        out: dict[str, Totals] = {}
        try:
            for name, start in since.items():
                usd, images = await self._read(*((_SUM_ALL, (start,)) if principal is None
                                                 else (_SUM_CHARGES, (principal, start))))
                out[name] = Totals(float(usd), int(images))
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"The spend ledger in {self._where} cannot be read ({exc}).") from None
        return out

    async def update_charge(self, charge_id: str, state: ChargeState, prediction_id: str | None = None, *,
                            usd: float | None = None) -> None:
        await self._write(lambda db: db.execute(_UPDATE_CHARGE, (state, prediction_id, usd, usd, time.time(),
                                                                 charge_id)))

    async def release_charge(self, charge_id: str) -> None:
        await self._write(lambda db: db.execute("DELETE FROM charges WHERE id=?", (charge_id,)))

    async def settle_charge(self, prediction_id: str, usd: float | None, estimated: bool) -> None:
        await self._write(lambda db: db.execute(
            _SETTLE_CHARGE, (usd, None if usd is None else int(estimated), time.time(), prediction_id)))

    async def charges_since(self, since: float) -> list[Charge]:
        try:
            rows = await self._read(f"SELECT {', '.join(_CHARGE_COLUMNS)} FROM charges WHERE created_at>=? "
                                    "ORDER BY created_at", (since,), many=True)
        except sqlite3.Error as exc:
            raise LedgerUnavailable(f"The spend ledger in {self._where} cannot be read ({exc}).") from None
        return [_charge(row) for row in rows]

    async def search(self, *, principal: str | None, query: str | None, provider: str | None, status: str | None,
                     since: float | None, limit: int, before: tuple[float, str] | None) -> list[Record]:
        """Runs in a worker thread on a connection of its own: a text query reads every prompt of the
        caller's journal (no index serves a substring match), which must not hold the event loop."""
        search = Search.of(principal=principal, query=query, provider=provider, status=status, since=since,
                           before=before)
        with self._lock:  # records not yet on disk are found too, in their latest version
            unwritten = [rec.copy() for rec in self._backlog.values()]
        sql, args = search.sql(limit + len(unwritten))  # an unwritten version may replace a row read

        def run() -> list[tuple[Any, ...]]:
            db = self._reader()
            try:
                db.create_function("flux_fold", 1, _fold, deterministic=True)
                return db.execute(sql, args).fetchall()
            finally:
                db.close()

        found = {rec.id: rec for rec in map(_record, await anyio.to_thread.run_sync(run))}
        for rec in unwritten:
            if search.matches(rec):
                found[rec.id] = rec
            else:
                found.pop(rec.id, None)
        return sorted(found.values(), key=lambda r: (r.created_at, r.id), reverse=True)[:limit]

    # --- failover attempts --------------------------------------------------------------------

    async def add_attempt(self, attempt: Attempt) -> bool:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO attempts (principal, provider, model, kind, reason, at) VALUES (?,?,?,?,?,?)",
                       (attempt.principal, attempt.provider, attempt.model, attempt.kind, attempt.reason, attempt.at))
            db.execute("DELETE FROM attempts WHERE at < ?", (attempt.at - ATTEMPT_RETENTION,))

        try:
            await self._write(work)
            return True
        except LedgerUnavailable as exc:
            log.info("attempt on %s not recorded: %s", attempt.provider, exc)
            return False

    async def refusals_since(self, since: float) -> dict[str, Refusals]:
        try:  # SQLite takes the bare columns of a MAX() aggregate from the row holding the maximum
            rows = await self._read(
                f"SELECT provider, COUNT(*), MAX(at), kind, reason FROM attempts WHERE at >= ? AND kind IN "
                f"({','.join('?' * len(HEALTH_KINDS))}) GROUP BY provider", (since, *HEALTH_KINDS), many=True)
        except sqlite3.Error as exc:
            log.info("recent refusals not read: %s", exc)
            return {}
        return {r[0]: Refusals(int(r[1]), float(r[2]), r[3], r[4]) for r in rows}

    async def remove_attempts(self, before: float, *, dry_run: bool = False) -> int:
        if dry_run:
            row = await self._read("SELECT COUNT(*) FROM attempts WHERE at < ?", (before,))
            return int(row[0])
        with self._lock:
            return int(self._db.execute("DELETE FROM attempts WHERE at < ?", (before,)).rowcount)

    def read_only(self) -> str | None:
        return self._read_only

    def _reader(self) -> sqlite3.Connection:
        """A connection of its own for a read off the event loop (read-only where the folder is)."""
        return _connect_read_only(self.path) if self._opened_read_only else _connect(self.path, timeout=_SLOW_TIMEOUT)

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._delivering is not None:
            self._delivering.cancel()
        self._write_delivered()
        self._closed.set()
        for thread in (self._retrier, self._checkpointer):
            if thread is not None:
                await anyio.to_thread.run_sync(thread.join, 5.0)
        if self.unwritten():
            with contextlib.suppress(sqlite3.Error):
                await anyio.to_thread.run_sync(self._flush_backlog, _connect(self.path, timeout=2.0))
        for rid in self.unwritten():
            log.error("prediction %s was never written to the journal in %s (%s); keep its id to check on it "
                      "with the provider", rid, self._where, self._backlog_reason)
        with self._lock:
            self._db.close()


def open_journal(home: Path) -> SqliteJournal:
    """The journal of the data folder `home`."""
    return SqliteJournal(home / "journal.sqlite3")


def check_journal(home: Path) -> None:
    """Opens and closes the journal in `home` (raises JournalUnusable): run before serving, so a folder
    that cannot be used is one clear line at start instead of a failure at the first call."""
    journal = open_journal(home)
    with journal._lock:
        journal._db.close()
