"""The journal on PostgreSQL (shared mode): `PgJournal`, the same `Journal` protocol as the SQLite file.

Selected when FLUX_MCP_DATABASE_URL is set (see `backends.open_journal`). Several replicas share one
database, so any of them answers for any prediction. The rules it keeps:

* **Statements only, never a wait, on a checked-out connection.** A connection is taken from the pool
  for one statement (or one short transaction) and given back at once; nothing else is awaited while
  it is held, so hundreds of calls waiting on jobs never exhaust the pool.
* **Writes that cannot land are kept, not lost** (as in the SQLite journal): a write that fails
  (database unreachable, pool exhausted, failover) goes to an in-memory backlog that a background task
  retries every second; `put` returns False so the result can say the job is not yet durable, and
  `get` answers from the backlog first. Later versions of a record queue behind the unwritten one.
* **Migrations are numbered and run once**, however many replicas start at the same moment: each
  start runs them in one explicit transaction that first takes a transaction-level advisory lock
  (a bare lock statement on an autocommit connection would be released at once), then re-reads the
  version. A database migrated by a newer flux-mcp is refused at start.
* **The spend ledger** (`flux_charges`): a reservation takes a transaction-level advisory lock, sums, and
  inserts, so two replicas never both spend the last dollar. A new job's reservation is written in the
  statement (or, with a budget to check, the transaction) of its intent, and its `billed` mark in the
  statement that journals its id (`Money` defers them here): one commit each, and neither row without the
  other. The ledger's other writes raise `LedgerUnavailable` when they cannot land (a budget fails closed).
* **`delivered` only goes from false to true**, whatever order the versions of a record land in.
* **Pooler-safe:** no server-side prepared statements (`prepare_threshold=None`), so the URL may point
  at PgBouncer in transaction mode.
* **Leases** (schema 4, see `Leases` in `replica`): a job is driven (polled, settled, kept) by one replica
  at a time, the holder of its lease (`lease_owner`, `lease_until`, `lease_epoch`). Before a paid submit
  the runner inserts an *intent* row (status `submitting`, no provider id yet, id `<provider>:intent-<hex>`)
  that already holds the caller's idempotency key, so a same-key call on any replica attaches to it
  instead of paying again; the provider's answer replaces the intent by the real record in one
  statement. Every write of a held job carries `lease_owner = me AND lease_epoch = mine` (fencing: a
  replica stalled past its lease cannot overwrite the new owner's work) and a final status is never
  changed to another one; the write that makes a job final (with its images) sends `pg_notify` in the
  same statement. Lease times are the database's clock, so replicas' clocks need not agree. An intent whose
  lease lapsed is claimed like a job (epoch + 1) when its provider has a history to look in, and replaced by
  the job found there (or made `unknown`) by a write fenced like any other (`settle_intent`).

Times are kept as epoch seconds (double precision) exactly as `Record` holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .journal import (
    _CHARGE_COLUMNS,
    _COLUMNS,
    ATTEMPT_RETENTION,
    DELIVERED_AFTER,
    HEALTH_KINDS,
    EVERYONE,
    RECENT,
    Attempt,
    Charge,
    ChargeState,
    JournalUnusable,
    LedgerUnavailable,
    Record,
    Refusals,
    Search,
    Totals,
    typical,
)
from .models import FINAL, ImageOutput
from .replica import CHANNEL, LEASE_SECONDS, LeaseLost, Waits, replica_id

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

    from .money import Bill, Reservation

log = logging.getLogger("flux_mcp.journal")

SCHEMA_VERSION = 6
"""The database layout this code reads and writes (the highest row of `flux_schema`)."""
_LOCK_KEY = 0x666C7578  # 'flux': the advisory lock that serialises migrations across replicas
_RECENT_TTL = 10.0
"""Seconds remembered durations are trusted: other replicas finish jobs too, so re-read sooner than SQLite."""
_RETRY_EVERY = 1.0
_JSON = frozenset({"request", "images", "outputs"})

_MIGRATIONS: dict[int, str] = {
    1: """
CREATE TABLE IF NOT EXISTS flux_predictions (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    native_id TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    status TEXT NOT NULL,
    request JSONB NOT NULL,
    images JSONB NOT NULL DEFAULT '[]',
    outputs JSONB NOT NULL DEFAULT '[]',
    error TEXT,
    cost_usd DOUBLE PRECISION,
    remaining_credits DOUBLE PRECISION,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    completed_at DOUBLE PRECISION,
    principal TEXT NOT NULL DEFAULT 'local',
    request_key TEXT,
    idempotency_key TEXT,
    delivered BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IF NOT EXISTS flux_predictions_durations ON flux_predictions (provider, model, completed_at DESC)
    WHERE status = 'succeeded';
CREATE INDEX IF NOT EXISTS flux_predictions_updated ON flux_predictions (updated_at)
    WHERE status IN ('succeeded', 'failed', 'canceled');
CREATE INDEX IF NOT EXISTS flux_predictions_rejoin ON flux_predictions (principal, request_key, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS flux_predictions_idempotency ON flux_predictions (principal, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS flux_uploads (
    sha256 TEXT NOT NULL,
    provider TEXT NOT NULL,
    url TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (sha256, provider)
);
""",
    # 1 -> 2: whether a cost is the provider's own figure or the price table's; the spend ledger, one row per
    # paid job (reserved at submit, billed once created, "unknown" when it may have started); and the
    # history listings (newest first, for one caller and for everyone).
    2: """
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS cost_estimated BOOLEAN NOT NULL DEFAULT FALSE;
CREATE TABLE IF NOT EXISTS flux_charges (
    id TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    images INTEGER NOT NULL,
    usd DOUBLE PRECISION,
    estimated BOOLEAN NOT NULL DEFAULT TRUE,
    state TEXT NOT NULL,
    prediction_id TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS flux_charges_when ON flux_charges (principal, created_at);
CREATE INDEX IF NOT EXISTS flux_charges_prediction ON flux_charges (prediction_id);
CREATE INDEX IF NOT EXISTS flux_predictions_history ON flux_predictions (principal, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS flux_predictions_created ON flux_predictions (created_at DESC, id DESC);
""",
    # 2 -> 3: failover attempts that created nothing (refused, or never sent), one row each; "auto" reads the
    # recent ones, so every replica puts a provider that refused lately last.
    3: """
CREATE TABLE IF NOT EXISTS flux_attempts (
    principal TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS flux_attempts_at ON flux_attempts (at, provider);
""",
    # 3 -> 4: leases. Who drives a pending job (a replica id), until when (epoch seconds, the database's
    # clock; NULL: nobody, whoever checks on it next takes it), the fencing epoch (+1 on every takeover), and
    # for a record that replaced an intent row, the intent's id (an id a caller may have been given).
    4: """
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS lease_owner TEXT;
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION;
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS lease_epoch BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS intent_id TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS flux_predictions_intent ON flux_predictions (intent_id)
    WHERE intent_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS flux_predictions_leases ON flux_predictions (lease_until)
    WHERE status IN ('submitting', 'starting', 'processing');
CREATE INDEX IF NOT EXISTS flux_predictions_owner ON flux_predictions (lease_owner)
    WHERE status IN ('submitting', 'starting', 'processing');
""",
    # 4 -> 5: orphans. When the job's lease was taken over from an owner that stopped renewing it (epoch
    # seconds), and when a key-less re-issue of the same call attached to it (see `PgJournal.adopt`).
    5: """
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS orphaned_at DOUBLE PRECISION;
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS adopted_at DOUBLE PRECISION;
""",
    # 5 -> 6: whether a job's completion moment measures its duration (`Record.timed`); the jobs recorded before
    # did (every job of a learned model looked early then). A constant default: no table rewrite.
    6: """
ALTER TABLE flux_predictions ADD COLUMN IF NOT EXISTS timed BOOLEAN NOT NULL DEFAULT TRUE;
""",
}

R = TypeVar("R")
_LEDGER_LOCK = 0x666C7579  # serialises every reservation across replicas (the server's budgets span principals)

_INSERT = (f"INSERT INTO flux_predictions ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
           f"ON CONFLICT (id) DO UPDATE SET "
           f"{', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS if c not in ('id', 'delivered'))}, "
           "delivered = flux_predictions.delivered OR EXCLUDED.delivered")
"""An upsert; `delivered` only ever goes from false to true (a late write of an older copy cannot undo it)."""
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM flux_predictions"

# --- leases (schema 4) ---------------------------------------------------------------------------------
_NOW = "extract(epoch from clock_timestamp())"
_PENDING = "('submitting', 'starting', 'processing')"
_LEASED = ("lease_owner", "lease_until", "lease_epoch", "intent_id")
_STATUS = _COLUMNS.index("status")
_ID = _COLUMNS.index("id")
_INTENT = (f"INSERT INTO flux_predictions ({', '.join(_COLUMNS + _LEASED)}) VALUES "
           f"({', '.join(['%s'] * len(_COLUMNS))}, %s, {_NOW} + %s, 0, %s) ON CONFLICT DO NOTHING RETURNING id")
"""An intent: its idempotency key is taken at once (nothing is inserted when another job holds it)."""
_GONE = "gone AS (DELETE FROM flux_predictions WHERE id = %s AND native_id = '' RETURNING lease_epoch, status)"
_REPLACE = (f"INSERT INTO flux_predictions ({', '.join(_COLUMNS + _LEASED)}) VALUES "
            f"({', '.join(['%s'] * len(_COLUMNS))}, %s, {_NOW} + %s, "
            f"(SELECT coalesce(max(lease_epoch), 0) FROM gone), %s) "
            f"ON CONFLICT (id) DO UPDATE SET "
            f"{', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS + _LEASED if c not in ('id', 'delivered'))} "
            "WHERE flux_predictions.lease_owner IS NOT DISTINCT FROM EXCLUDED.lease_owner "
            f"RETURNING lease_epoch, (SELECT max(status) FROM gone) AS was")
_SUBMITTED = f"WITH {_GONE} {_REPLACE}"
"""The provider's answer: the intent row goes and the real record (same key, same epoch) comes, at once. A row
already there under the job's id is only rewritten by its own lease owner (a retry of this write): one another
replica made from the provider's history while this one stalled is left alone (no row returned: epoch 0, so
this replica's later writes are fenced out)."""
_BILL = ("UPDATE flux_charges SET state = 'billed', prediction_id = %s, usd = COALESCE(%s::double precision, usd), "
         "estimated = (CASE WHEN %s::double precision IS NULL THEN estimated ELSE false END), updated_at = %s "
         "WHERE id = %s")
_SUBMITTED_BILLED = f"WITH {_GONE}, ins AS ({_REPLACE}), bill AS ({_BILL}) SELECT lease_epoch, was FROM ins"
"""The same, and the job's charge in the ledger becomes `billed` (with the provider's cost when it gave one), in
one statement: one commit."""
_FENCED = (_INSERT + " WHERE flux_predictions.lease_owner = %s AND flux_predictions.lease_epoch = %s AND "
           f"(flux_predictions.status IN {_PENDING} OR flux_predictions.status = EXCLUDED.status) RETURNING id")
"""A held job's write: only while this replica's lease (owner and epoch) is on the row; a final status stays."""
_NOTIFY = f"WITH w AS ({{}}) SELECT id, pg_notify('{CHANNEL}', id) FROM w"
_SETTLE = ("s AS (UPDATE flux_charges SET usd = %s::double precision, estimated = false, updated_at = %s "
           "WHERE prediction_id = %s AND EXISTS (SELECT 1 FROM w))")
"""A final write's charge settled to the provider's own figure for the job's cost, only if the write landed."""


def _write_sql(write: str, *, notify: bool, settle: bool) -> str:
    """One statement for a record's write (`write`, an upsert that returns the id when it lands): with the
    notification of a completed job and the settle of its charge in the ledger when asked (one commit)."""
    if not notify and not settle:
        return write
    ctes = f"w AS ({write})" + (f", {_SETTLE}" if settle else "")
    notified = f", pg_notify('{CHANNEL}', id)" if notify else ""
    return f"WITH {ctes} SELECT id{notified} FROM w"
_SELECT_LEASE = (f"SELECT {', '.join(_COLUMNS)}, lease_owner IS NOT NULL AND lease_until > {_NOW} "
                 "FROM flux_predictions WHERE id = %s OR intent_id = %s ORDER BY native_id = '' LIMIT 1")
_CLAIM = (f"UPDATE flux_predictions SET lease_owner = %s, lease_until = {_NOW} + %s, lease_epoch = lease_epoch + 1 "
          f"WHERE id = %s AND status IN ('starting', 'processing') AND native_id <> '' "
          f"AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until < {_NOW}) "
          f"RETURNING lease_epoch, {', '.join(_COLUMNS)}")
_CLAIM_LAPSED = (f"WITH due AS (SELECT id FROM flux_predictions WHERE status IN ('starting', 'processing') "
                 f"AND native_id <> '' AND lease_until < {_NOW} ORDER BY lease_until LIMIT %s "
                 f"FOR UPDATE SKIP LOCKED) "
                 f"UPDATE flux_predictions p SET lease_owner = %s, lease_until = {_NOW} + %s, "
                 f"lease_epoch = p.lease_epoch + 1, orphaned_at = coalesce(p.orphaned_at, {_NOW}) "
                 f"FROM due WHERE p.id = due.id "
                 f"RETURNING p.lease_epoch, {', '.join('p.' + c for c in _COLUMNS)}")
"""The reconciler's claim: only leases that lapsed (a NULL lease is a job nobody waits on: left to a check).
The job becomes an orphan (`orphaned_at`): its owner stopped, and with it the call that was waiting on it."""
UNKNOWN_ERROR = ("The server that sent this job's paid request stopped before the provider answered, so whether "
                 "the provider started the job is unknown. It is never resubmitted: look in the provider's "
                 "dashboard before starting it again.")
_UNKNOWN = (f"status = 'unknown', error = %s, completed_at = {_NOW}, updated_at = {_NOW}, lease_owner = NULL, "
            f"lease_until = NULL, lease_epoch = p.lease_epoch + 1")
_EXPIRE_INTENTS = (
    f"WITH lapsed AS (SELECT id, provider = ANY(%s) AS look FROM flux_predictions WHERE status = 'submitting' "
    f"AND lease_until < {_NOW} FOR UPDATE SKIP LOCKED), "
    f"gave_up AS (UPDATE flux_predictions p SET {_UNKNOWN} FROM lapsed WHERE p.id = lapsed.id AND NOT lapsed.look "
    f"RETURNING p.id), "
    f"looking AS (UPDATE flux_predictions p SET lease_owner = %s, lease_until = {_NOW} + %s, "
    f"lease_epoch = p.lease_epoch + 1 FROM lapsed WHERE p.id = lapsed.id AND lapsed.look "
    f"RETURNING p.lease_epoch, {', '.join('p.' + c for c in _COLUMNS)}) "
    f"SELECT NULL::bigint, g.id, {', '.join(['NULL'] * (len(_COLUMNS) - 1))} FROM gave_up g, "
    f"pg_notify('{CHANNEL}', g.id) UNION ALL SELECT * FROM looking")
"""Lapsed intents: those of providers that cannot look (`provider = ANY` the ones that can) become `unknown`
(notified); the others are claimed (epoch + 1) for the reconciler to look for their jobs (`settle_intent`)."""
_GIVE_UP = _NOTIFY.format(f"UPDATE flux_predictions p SET {_UNKNOWN} WHERE id = %s AND status = 'submitting' "
                          "AND lease_owner = %s AND lease_epoch = %s RETURNING id")
_FOUND = (f"WITH gone AS (DELETE FROM flux_predictions WHERE id = %s AND status = 'submitting' AND lease_owner = %s "
          "AND lease_epoch = %s AND NOT EXISTS (SELECT 1 FROM flux_predictions WHERE id = %s) RETURNING lease_epoch), "
          f"ins AS (INSERT INTO flux_predictions ({', '.join(_COLUMNS + _LEASED)}, orphaned_at) "
          f"SELECT {', '.join(['%s'] * len(_COLUMNS))}, %s, {_NOW} + %s, gone.lease_epoch, %s, {_NOW} FROM gone "
          "RETURNING id), "
          "bill AS (UPDATE flux_charges SET state = 'billed', prediction_id = %s, updated_at = %s WHERE id = %s "
          "AND state <> 'billed' AND EXISTS (SELECT 1 FROM ins)) "
          "SELECT id FROM ins")
"""A claimed intent whose job the provider's history showed: the intent goes and the job comes (still held here,
same epoch, an orphan), its charge billed, in one statement; nothing when the lease moved on or the id is taken."""
_RIVALS = (f"{_SELECT} WHERE provider = %s AND ((native_id = '' AND created_at >= %s AND id <> ALL(%s)) "
           "OR id = ANY(%s))")
_ADOPTABLE = ("principal = %s AND request_key = %s AND NOT delivered AND created_at >= %s AND id <> ALL(%s)")
_ADOPT = (f"WITH pick AS (SELECT id FROM flux_predictions WHERE {_ADOPTABLE} AND adopted_at IS NULL "
          f"AND native_id <> '' AND status <> 'unknown' ORDER BY orphaned_at IS NULL, created_at LIMIT 1 "
          f"FOR UPDATE SKIP LOCKED), "
          f"adopted AS (UPDATE flux_predictions p SET adopted_at = {_NOW} FROM pick WHERE p.id = pick.id "
          f"RETURNING {', '.join('p.' + c for c in _COLUMNS)}) "
          f"SELECT *, TRUE FROM adopted UNION ALL "
          f"(SELECT {', '.join(_COLUMNS)}, FALSE FROM flux_predictions WHERE {_ADOPTABLE} "
          f"AND (native_id = '' OR status = 'unknown') ORDER BY created_at DESC LIMIT 1)")
"""A key-less re-issue's one statement: adopts the first free orphan (else any other job of the call whose
answer never reached its caller), and reads the newest of the call's jobs that cannot be adopted (an intent,
an `unknown` job): joined, not adopted, when nothing could be."""
_PRUNABLE = "('succeeded', 'failed', 'canceled', 'unknown')"
"""Statuses retention removes once old: final ones, and `unknown` (nothing more will be learnt about it)."""
_HEARTBEAT = (f"UPDATE flux_predictions SET lease_until = {_NOW} + %s WHERE lease_owner = %s "
              f"AND status IN {_PENDING} AND lease_until IS NOT NULL")
_END_LEASES = (f"UPDATE flux_predictions SET lease_until = {_NOW} WHERE lease_owner = %s AND status IN {_PENDING} "
               f"AND lease_until IS NOT NULL")
_HAND_OVER_JOBS = (f"UPDATE flux_predictions SET lease_until = {_NOW} WHERE lease_owner = %s "
                   f"AND status IN ('starting', 'processing') AND native_id <> '' AND lease_until > {_NOW}")
"""A stopping replica's submitted jobs (not its intents: their submits are still being answered, and a lapsed
intent becomes `unknown`): their leases end now, for another replica's reconciler to take them over."""
_HAND_OVER = (f"UPDATE flux_predictions SET lease_until = {_NOW} WHERE id = %s AND lease_owner = %s "
              f"AND lease_epoch = %s AND status IN {_PENDING}")
"""A stopping replica's job: its lease ends now, so another replica's reconciler takes it over at once."""
_RELEASE = (f"UPDATE flux_predictions SET lease_owner = NULL, lease_until = NULL WHERE id = %s AND lease_owner = %s "
            f"AND lease_epoch = %s AND status IN {_PENDING}")


_DELIVERED = ("WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) "
              "UPDATE flux_predictions SET delivered = TRUE FROM relaxed WHERE id = ANY(%s) AND NOT delivered")
"""That answers reached their callers, committed without waiting for the disk (its own transaction only): a
crash that loses it only lets a later identical call join the job, so nothing waits for a flush."""


def _done(rec: Record) -> bool:
    """Whether a write makes the job's answer complete (final, with its images when it succeeded): waiters
    are woken then, not at the final status that precedes the download."""
    return rec.status == "unknown" or (rec.status in FINAL and (rec.status != "succeeded" or bool(rec.images)))


def display_url(url: str) -> str:
    """The database URL without its password (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _row(rec: Record) -> tuple[Any, ...]:
    from psycopg.types.json import Jsonb

    values: list[Any] = []
    for column in _COLUMNS:
        value = getattr(rec, column)
        if column == "images":
            value = [i.model_dump() for i in value]
        values.append(Jsonb(value) if column in _JSON else value)
    return tuple(values)


def _record(row: Sequence[Any]) -> Record:
    data = dict(zip(_COLUMNS, row, strict=True))
    if data["status"] == "submitting":  # an intent: the submit is on its way (no provider id yet)
        data["status"] = "starting"
    data["images"] = [ImageOutput(**i) for i in data["images"]]
    data["delivered"] = bool(data["delivered"])
    data["cost_estimated"] = bool(data["cost_estimated"])
    data["timed"] = bool(data["timed"])
    return Record(**data)


_INSERT_CHARGE = (f"INSERT INTO flux_charges ({', '.join(_CHARGE_COLUMNS)}) "
                  f"VALUES ({', '.join(['%s'] * len(_CHARGE_COLUMNS))})")
_SUM_CHARGES = ("SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(images), 0) FROM flux_charges WHERE principal = %s "
                "AND created_at >= %s")
_SUM_ALL = "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(images), 0) FROM flux_charges WHERE created_at >= %s"


_CHARGE_TYPES = ("text", "text", "text", "text", "integer", "double precision", "boolean", "text", "text",
                 "double precision", "double precision")
_INTENT_CHARGED = (f"WITH i AS ({_INTENT}), c AS (INSERT INTO flux_charges ({', '.join(_CHARGE_COLUMNS)}) "
                   f"SELECT {', '.join(f'%s::{t}' for t in _CHARGE_TYPES)} WHERE EXISTS (SELECT 1 FROM i)) "
                   "SELECT id FROM i")
"""An intent and its reservation in the ledger in one statement (one commit); neither lands when the key is
taken."""


def _charge_row(c: Charge) -> tuple[Any, ...]:
    return (c.id, c.principal, c.provider, c.model, c.images, c.usd, c.estimated, c.state, c.prediction_id,
            c.created_at, c.updated_at)


def _charge(row: Sequence[Any]) -> Charge:
    return Charge(id=row[0], principal=row[1], provider=row[2], model=row[3], images=int(row[4]), usd=row[5],
                  estimated=bool(row[6]), state=row[7], prediction_id=row[8], created_at=row[9], updated_at=row[10])


def _search_sql(search: Search, limit: int) -> tuple[str, tuple[Any, ...]]:
    """`Search` as PostgreSQL: each word must appear in the prompt, both lower-cased (the SQLite journal
    folds with Python's casefold; the two differ only for a few letters such as the German sharp s)."""
    where: list[str] = ["status <> 'submitting'"]  # an intent is listed once the provider answered
    args: list[Any] = []
    if search.principal is not None:
        where.append("principal = %s")
        args.append(search.principal)
    if search.provider:
        where.append("provider = %s")
        args.append(search.provider)
    if search.statuses:
        where.append("status = ANY(%s)")
        args.append(list(search.statuses))
    if search.since is not None:
        where.append("created_at >= %s")
        args.append(search.since)
    if search.before is not None:
        where.append("(created_at, id) < (%s, %s)")
        args.extend(search.before)
    for word in search.words:
        where.append("strpos(lower(coalesce(request->>'prompt', '')), lower(%s)) > 0")
        args.append(word)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    return f"{_SELECT}{clause} ORDER BY created_at DESC, id DESC LIMIT %s", (*args, max(limit, 0))

class PgJournal:
    """The journal in a PostgreSQL database, shared by every replica. Open with `await PgJournal.open(url)`."""

    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Any]], where: str, *, owner: str | None = None,
                 lease_seconds: float = LEASE_SECONDS, conninfo: str = ""):
        self.pool = pool
        self.where = where
        self.owner = owner or replica_id()
        """This replica's name in `lease_owner`."""
        self.lease_seconds = lease_seconds
        self.conninfo = conninfo
        """The URL of the LISTEN connection (not pooled): FLUX_MCP_LISTEN_DATABASE_URL, else the pool's URL."""
        self.waits = Waits()
        """Calls waiting on jobs, woken by final writes here and by notifications from other replicas."""
        self._held: dict[str, int] = {}
        """Jobs whose lease this replica holds, with the epoch it holds them at."""
        self._intents: dict[str, str] = {}
        """Records (by id) whose write must replace an intent row (by its id), until it lands."""
        self._bills: dict[str, Bill] = {}
        """Records (by id) whose intent-replacing write also bills their charge in the ledger, until it lands."""
        self._settles: dict[str, float] = {}
        """Records (by id) whose write also settles their charge to the provider's cost (USD), until it lands."""
        self._delivered: set[str] = set()
        """Jobs whose answer reached its caller here, their delivered mark not written yet (see `mark_delivered`)."""
        self._marking: set[str] = set()
        """Of those, the ones whose mark is being written now."""
        self._delivering: asyncio.TimerHandle | None = None
        self._writing: set[asyncio.Task[None]] = set()
        self._recent: dict[tuple[str, str], tuple[float, list[tuple[str, float]]]] = {}
        self._backlog: dict[str, Record] = {}
        self._backlog_reason: str | None = None
        self._retrier: asyncio.Task[None] | None = None
        self._closed = False
        self._reserving = asyncio.Lock()
        """One of this replica's reservations at a time waits on the ledger's lock (one for every principal: the
        server's budgets sum them all), so a burst of calls holds one pooled connection, not all of them (the
        heartbeat needs one). Calls with no limit to keep take neither lock."""

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0,
                   owner: str | None = None, lease_seconds: float = LEASE_SECONDS,
                   listen_url: str | None = None) -> PgJournal:
        """Connects (waiting up to `timeout` for the database), migrates, and checks the layout. `owner` names
        this replica in leases (default: host, pid and a random part); `lease_seconds` is the lease length;
        `listen_url` is where the replica's LISTEN connection goes (default: `url`; LISTEN needs a session of
        its own, which a pooler in transaction mode does not give)."""
        try:
            from psycopg_pool import AsyncConnectionPool
        except ImportError:
            raise JournalUnusable("FLUX_MCP_DATABASE_URL is set but PostgreSQL support is not installed: "
                                  "pip install 'flux-image-mcp[cluster]'.") from None
        import psycopg

        where = display_url(url)
        pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, timeout=timeout, name="flux-mcp",
            kwargs={"autocommit": True, "prepare_threshold": None, "application_name": "flux-mcp"})
        try:
            await pool.open(wait=True, timeout=timeout)
        except Exception as exc:  # PoolTimeout, bad URL: one clear line at start
            await pool.close()
            raise JournalUnusable(f"The database {where} cannot be reached ({type(exc).__name__}: "
                                  f"{_first_line(exc)}). Check FLUX_MCP_DATABASE_URL.") from None
        journal = cls(pool, where, owner=owner, lease_seconds=lease_seconds, conninfo=listen_url or url)
        try:
            await journal._migrate()
        except JournalUnusable:
            await pool.close()
            raise
        except psycopg.Error as exc:
            await pool.close()
            raise JournalUnusable(f"The database {where} cannot be prepared ({_first_line(exc)}). Check that "
                                  "the FLUX_MCP_DATABASE_URL user may create tables.") from None
        return journal

    async def _migrate(self) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            await conn.execute("CREATE TABLE IF NOT EXISTS flux_schema (version INTEGER PRIMARY KEY, "
                               "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
            cur = await conn.execute("SELECT coalesce(max(version), 0) FROM flux_schema")
            row = await cur.fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise JournalUnusable(
                    f"The database {self.where} was migrated by a newer flux-mcp (schema {version}; this one "
                    f"reads {SCHEMA_VERSION}). Upgrade every replica to the same flux-mcp.")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in filter(str.strip, _MIGRATIONS[step].split(";")):
                    await conn.execute(statement)
                await conn.execute("INSERT INTO flux_schema (version) VALUES (%s)", (step,))
                log.info("database %s migrated to schema %d", self.where, step)
            cur = await conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = "
                                     "'flux_predictions' AND table_schema = current_schema()")
            have = {r[0] for r in await cur.fetchall()}
        missing = [c for c in _COLUMNS if c not in have]
        if missing:
            raise JournalUnusable(f"The database {self.where} lacks column(s) {', '.join(missing)}: it was "
                                  "written by another flux-mcp version. Upgrade every replica to the same one.")

    # --- writes -------------------------------------------------------------------------------

    async def put(self, record: Record, bill: Bill | None = None, *, settle: bool = False) -> bool:
        if settle and record.cost_usd is not None:  # written with the record (also when retried from the backlog)
            self._settles[record.id] = record.cost_usd
        if bill is not None:  # a job without an intent (the runner bills in `submitted` here): its own write
            landed = await self.put(record)
            try:
                if bill.charge is not None:
                    await self.reserve(bill.charge, {}, None)
                else:
                    await self.update_charge(bill.charge_id, "billed", bill.prediction_id, usd=bill.usd)
            except LedgerUnavailable as exc:
                log.warning("charge %s not marked billed: %s", bill.charge_id, exc)
            return landed
        self._remember_duration(record)
        if record.id not in self._backlog and not self._backlog:
            try:
                await self._write(record)  # LeaseLost passes through: a fenced write is dropped, never retried
                return True
            except _kept() as exc:
                reason = _first_line(exc)
        else:
            reason = self._backlog_reason or "earlier writes are still waiting"
        self._backlog[record.id] = record.copy()  # later writes queue behind unwritten ones, in order
        self._backlog_reason = reason
        self._start_retrier()
        log.warning("journal write of %s did not land (%s); kept in memory and retried", record.id, reason)
        return False

    async def _write(self, record: Record) -> None:
        """Writes a record; a held job's write is fenced (raises LeaseLost when this replica lost the lease)
        and the write that completes a job notifies every replica in the same statement."""
        intent = self._intents.get(record.id)
        if intent is not None:
            return await self._replace_intent(intent, record)
        epoch = self._held.get(record.id)
        cost = self._settles.get(record.id)
        settle: tuple[Any, ...] = () if cost is None else (cost, time.time(), record.id)
        if epoch is None:
            sql = _write_sql(_INSERT + " RETURNING id", notify=_done(record), settle=bool(settle))
            async with self.pool.connection() as conn:
                await conn.execute(sql, (*_row(record), *settle))
            self._settles.pop(record.id, None)
            if _done(record):
                self.waits.wake(record.id)
            return
        sql = _write_sql(_FENCED, notify=_done(record), settle=bool(settle))
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, (*_row(record), self.owner, epoch, *settle))
            landed = await cur.fetchone() is not None
        self._settles.pop(record.id, None)  # settled with the write, or never: the new owner settles it
        if not landed:
            self._held.pop(record.id, None)
            log.warning("write of %s dropped: another replica took the job over (this one's lease lapsed)",
                        record.id)
            raise LeaseLost(record.id)
        if _done(record):
            self.waits.wake(record.id)

    def unwritten(self) -> list[str]:
        return list(self._backlog)

    def _start_retrier(self) -> None:
        if not self._closed and (self._retrier is None or self._retrier.done()):
            self._retrier = asyncio.get_running_loop().create_task(self._retry_backlog(), name="flux-mcp-journal")

    async def _retry_backlog(self) -> None:
        while self._backlog and not self._closed:
            await asyncio.sleep(_RETRY_EVERY)
            await self._flush_backlog()

    async def _flush_backlog(self) -> bool:
        """One attempt at every unwritten record, oldest first; True when none is left."""
        for rec in list(self._backlog.values()):
            try:
                await self._write(rec)
            except LeaseLost:
                pass  # another replica owns the job now: this older version is dropped
            except _kept() as exc:
                self._backlog_reason = _first_line(exc)
                return False
            if self._backlog.get(rec.id) is rec:
                del self._backlog[rec.id]
                log.info("journal write of %s landed", rec.id)
        return not self._backlog

    async def add_upload(self, sha256: str, provider: str, url: str) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO flux_uploads (sha256, provider, url, created_at) VALUES (%s, %s, %s, %s) "
                    "ON CONFLICT (sha256, provider) DO UPDATE SET url = EXCLUDED.url, created_at = EXCLUDED.created_at",
                    (sha256, provider, url, time.time()))
        except (psycopg.Error, PoolTimeout) as exc:  # a cache: losing it costs one more (free) upload later
            log.info("upload URL not recorded: %s", _first_line(exc))

    # --- reads --------------------------------------------------------------------------------

    async def _fetch(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(sql, args)
            return list(await cur.fetchall())

    async def get(self, prediction_id: str) -> Record | None:
        pending = self._backlog.get(prediction_id)
        if pending is not None:
            return pending.copy()
        rows = await self._fetch(f"{_SELECT} WHERE id = %s", (prediction_id,))
        if not rows and ":intent-" in prediction_id:  # an id given out before the provider answered
            rows = await self._fetch(f"{_SELECT} WHERE intent_id = %s", (prediction_id,))
        return self._marked(_record(rows[0])) if rows else None

    def _marked(self, rec: Record) -> Record:
        """A record as read, delivered if its delivered mark is noted here and not written yet."""
        rec.delivered = rec.delivered or rec.id in self._delivered
        return rec

    async def typical_duration(self, provider: str, model: str) -> float | None:
        return typical(await self.recent_durations(provider, model))

    async def recent_durations(self, provider: str, model: str) -> list[float]:
        import psycopg
        from psycopg_pool import PoolTimeout

        key = (provider, model)
        cached = self._recent.get(key)
        if cached is None or time.monotonic() - cached[0] >= _RECENT_TTL:
            try:
                rows = await self._fetch(
                    "SELECT id, completed_at - created_at FROM flux_predictions WHERE provider = %s AND model = %s "
                    "AND status = 'succeeded' AND completed_at IS NOT NULL AND lease_epoch = 0 AND timed "
                    "ORDER BY completed_at DESC LIMIT %s",
                    (provider, model, RECENT))
            except (psycopg.Error, PoolTimeout) as exc:
                log.info("durations not read: %s", _first_line(exc))
                rows = []
            cached = (time.monotonic(), [(r[0], r[1]) for r in rows if r[1] is not None and r[1] >= 0])
            self._recent[key] = cached
        return [d for _, d in cached[1]]

    def _remember_duration(self, rec: Record) -> None:
        """Learns a finished job's length, unless another replica's (or a later call's) claim finished it: that
        one saw the end only when it took the job over (lease_epoch > 0), seconds late, and a burst of takeovers
        would teach every replica to wait that much longer before its first status request."""
        if (rec.status != "succeeded" or not rec.timed or rec.completed_at is None
                or rec.completed_at < rec.created_at):
            return
        if self._held.get(rec.id, 0) > 0:
            return
        cached = self._recent.get((rec.provider, rec.model))
        if cached is not None and all(rid != rec.id for rid, _ in cached[1]):
            cached[1].insert(0, (rec.id, rec.completed_at - rec.created_at))
            del cached[1][RECENT:]

    async def upload_url(self, sha256: str, provider: str, max_age: float) -> str | None:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            rows = await self._fetch("SELECT url, created_at FROM flux_uploads WHERE sha256 = %s AND provider = %s",
                                     (sha256, provider))
        except (psycopg.Error, PoolTimeout):
            return None
        if rows and time.time() - rows[0][1] < max_age:
            return str(rows[0][0])
        return None

    async def finished_before(self, before: float, limit: int) -> list[Record]:
        rows = await self._fetch(f"{_SELECT} WHERE status IN {_PRUNABLE} AND updated_at < %s "
                                 "ORDER BY updated_at LIMIT %s", (before, limit))
        return [_record(r) for r in rows]

    async def remove(self, prediction_ids: list[str], uploads_before: float | None = None) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"DELETE FROM flux_predictions WHERE id = ANY(%s) AND status IN {_PRUNABLE}",
                                     (list(prediction_ids),))
            removed = cur.rowcount
            if uploads_before is not None:
                await conn.execute("DELETE FROM flux_uploads WHERE created_at < %s", (uploads_before,))
        return removed

    async def release_stale_reservations(self, before: float, *, dry_run: bool = False) -> int:
        """Releases (deletes, never bills) spend-ledger reservations still `reserved` with no job, last written
        before `before`: the call that made one reserves it just before its submit and marks it within that
        submit, so one left that long belongs to a replica that stopped before its intent was sent or
        answered; it only holds budget. Returns how many (would) go."""
        where = "FROM flux_charges WHERE state = 'reserved' AND prediction_id IS NULL AND updated_at < %s"
        if dry_run:
            return int((await self._fetch(f"SELECT count(*) {where}", (before,)))[0][0])
        async with self.pool.connection() as conn:
            cur = await conn.execute(f"DELETE {where}", (before,))
            return int(cur.rowcount)

    async def remove_uploads(self, before: float, *, dry_run: bool = False) -> int:
        """Removes cached provider upload URLs recorded before `before` (they are reused for an hour only)."""
        if dry_run:
            return int((await self._fetch("SELECT count(*) FROM flux_uploads WHERE created_at < %s", (before,)))[0][0])
        async with self.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM flux_uploads WHERE created_at < %s", (before,))
            return int(cur.rowcount)

    async def rejoinable(self, principal: str, request_key: str, since: float) -> list[Record]:
        pending = [r.copy() for r in self._backlog.values() if r.principal == principal
                   and r.request_key == request_key and not r.delivered and r.created_at >= since]
        rows = await self._fetch(f"{_SELECT} WHERE principal = %s AND request_key = %s AND NOT delivered AND "
                                 "created_at >= %s AND id <> ALL(%s) ORDER BY created_at DESC LIMIT 5",
                                 (principal, request_key, since, self._not_delivered()))
        found = {r.id: r for r in [*(_record(row) for row in rows), *pending] if r.id not in self._delivered}
        return sorted(found.values(), key=lambda r: r.created_at, reverse=True)

    async def by_idempotency_key(self, principal: str, key: str) -> Record | None:
        pending = next((r.copy() for r in self._backlog.values()
                        if r.principal == principal and r.idempotency_key == key), None)
        if pending is not None:
            return pending
        rows = await self._fetch(f"{_SELECT} WHERE principal = %s AND idempotency_key = %s", (principal, key))
        return self._marked(_record(rows[0])) if rows else None

    async def mark_delivered(self, prediction_id: str) -> None:
        """Noted at once for this replica (its adoptions and rejoins leave the job out from here on) and written
        with the other marks of the next DELIVERED_AFTER seconds in one statement, after the answer (as the
        SQLite journal does): the call does not wait for it. Until it lands only a call on another replica
        could still join the job, within that moment: the safe side (a join pays nothing)."""
        pending = self._backlog.get(prediction_id)
        if pending is not None:
            pending.delivered = True
            return
        self._delivered.add(prediction_id)
        if self._delivering is None:
            self._delivering = asyncio.get_running_loop().call_later(DELIVERED_AFTER, self._deliver_soon)

    def _deliver_soon(self) -> None:
        self._delivering = None
        task = asyncio.get_running_loop().create_task(self._write_delivered(), name="flux-mcp-delivered")
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write_delivered(self) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        ids = sorted(self._delivered - self._marking)
        if not ids:
            return
        self._marking.update(ids)
        try:
            async with self.pool.connection() as conn:
                await conn.execute(_DELIVERED, (ids,))
        except (psycopg.Error, PoolTimeout) as exc:  # losing it only means a later identical call may join these
            log.info("delivery of %d job(s) not recorded: %s", len(ids), _first_line(exc))
        finally:
            self._marking.difference_update(ids)
            self._delivered.difference_update(ids)

    def _not_delivered(self, skip: Sequence[str] = ()) -> list[str]:
        """Ids a rejoin or adoption leaves out: `skip`, and the jobs whose delivered mark is not written yet."""
        return [*skip, *self._delivered]

    async def search(self, *, principal: str | None, query: str | None, provider: str | None, status: str | None,
                     since: float | None, limit: int, before: tuple[float, str] | None) -> list[Record]:
        search = Search.of(principal=principal, query=query, provider=provider, status=status, since=since,
                           before=before)
        unwritten = [rec.copy() for rec in self._backlog.values()]  # found too, in their latest version
        sql, args = _search_sql(search, limit + len(unwritten))  # an unwritten version may replace a row read
        found = {rec.id: rec for rec in map(_record, await self._fetch(sql, args))}
        for rec in unwritten:
            if search.matches(rec):
                found[rec.id] = rec
            else:
                found.pop(rec.id, None)
        return sorted(found.values(), key=lambda r: (r.created_at, r.id), reverse=True)[:limit]

    # --- the spend ledger ---------------------------------------------------------------------

    async def _ledger(self, work: Callable[[AsyncConnection[Any]], Any], what: str = "written") -> Any:
        """Runs `work` in one transaction; raises LedgerUnavailable when the database cannot do it."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self.pool.connection() as conn, conn.transaction():
                return await work(conn)
        except (psycopg.Error, PoolTimeout) as exc:
            raise LedgerUnavailable(f"The spend ledger in {self.where} cannot be {what} ({_first_line(exc)}).") \
                from None

    async def reserve(self, charge: Charge, since: Mapping[str, float],
                      check: Callable[[Mapping[str, Totals]], R | None] | None) -> R | None:
        if check is None:
            async def insert(conn: AsyncConnection[Any]) -> None:
                await conn.execute(_INSERT_CHARGE, _charge_row(charge))

            await self._ledger(insert)
            return None

        async def work(conn: AsyncConnection[Any]) -> R | None:
            # The ledger's lock first: no other reservation (of any principal, on any replica) between the sums
            # and the insert. One lock for all: the server's budgets sum every principal's charges.
            await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LEDGER_LOCK,))
            totals = await _totals(conn, charge.principal, since)
            totals.update({EVERYONE + k: v for k, v in (await _totals(conn, None, since)).items()})
            refusal = check(totals)
            if refusal is None:
                await conn.execute(_INSERT_CHARGE, _charge_row(charge))
            return refusal

        async with self._reserving:
            result: R | None = await self._ledger(work)
        return result

    async def totals(self, principal: str | None, since: Mapping[str, float]) -> dict[str, Totals]:
        async def work(conn: AsyncConnection[Any]) -> dict[str, Totals]:
            return await _totals(conn, principal, since)

        result: dict[str, Totals] = await self._ledger(work, "read")
        return result

    async def update_charge(self, charge_id: str, state: ChargeState, prediction_id: str | None = None, *,
                            usd: float | None = None) -> None:
        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute(
                "UPDATE flux_charges SET state = %s, prediction_id = COALESCE(%s, prediction_id), usd = "
                "COALESCE(%s::double precision, usd), estimated = (CASE WHEN %s::double precision IS NULL THEN "
                "estimated ELSE false END), updated_at = %s WHERE id = %s",
                (state, prediction_id, usd, usd, time.time(), charge_id))

        await self._ledger(work)

    async def release_charge(self, charge_id: str) -> None:
        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute("DELETE FROM flux_charges WHERE id = %s", (charge_id,))

        await self._ledger(work)

    async def settle_charge(self, prediction_id: str, usd: float | None, estimated: bool) -> None:
        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute(
                "UPDATE flux_charges SET usd = COALESCE(%s::double precision, usd), estimated = "
                "COALESCE(%s::boolean, estimated), updated_at = %s WHERE prediction_id = %s",
                (usd, None if usd is None else estimated, time.time(), prediction_id))

        await self._ledger(work)

    async def charges_since(self, since: float) -> list[Charge]:
        async def work(conn: AsyncConnection[Any]) -> list[Charge]:
            cur = await conn.execute(f"SELECT {', '.join(_CHARGE_COLUMNS)} FROM flux_charges WHERE created_at >= %s "
                                     "ORDER BY created_at", (since,))
            return [_charge(row) for row in await cur.fetchall()]

        result: list[Charge] = await self._ledger(work, "read")
        return result

    # --- failover attempts --------------------------------------------------------------------

    async def add_attempt(self, attempt: Attempt) -> bool:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self.pool.connection() as conn:
                await conn.execute("INSERT INTO flux_attempts (principal, provider, model, kind, reason, at) VALUES "
                                   "(%s, %s, %s, %s, %s, %s)", (attempt.principal, attempt.provider, attempt.model,
                                                                attempt.kind, attempt.reason, attempt.at))
                await conn.execute("DELETE FROM flux_attempts WHERE at < %s", (attempt.at - ATTEMPT_RETENTION,))
            return True
        except (psycopg.Error, PoolTimeout) as exc:  # it only informs later choices
            log.info("attempt on %s not recorded: %s", attempt.provider, _first_line(exc))
            return False

    async def refusals_since(self, since: float) -> dict[str, Refusals]:
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            rows = await self._fetch(
                "SELECT provider, count(*), max(at), (array_agg(kind ORDER BY at DESC))[1], "
                "(array_agg(reason ORDER BY at DESC))[1] FROM flux_attempts WHERE at >= %s AND kind = ANY(%s) "
                "GROUP BY provider", (since, list(HEALTH_KINDS)))
        except (psycopg.Error, PoolTimeout) as exc:
            log.info("recent refusals not read: %s", _first_line(exc))
            return {}
        return {r[0]: Refusals(int(r[1]), float(r[2]), r[3], r[4]) for r in rows}

    async def remove_attempts(self, before: float, *, dry_run: bool = False) -> int:
        if dry_run:
            rows = await self._fetch("SELECT count(*) FROM flux_attempts WHERE at < %s", (before,))
            return int(rows[0][0])
        async with self.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM flux_attempts WHERE at < %s", (before,))
            return int(cur.rowcount)

    def read_only(self) -> str | None:
        return None  # a database that refuses writes for a while keeps them in the backlog

    # --- leases (the `replica.Leases` protocol and the replica's own statements) ----------------

    reserves_with_intent = True
    """A job's reservation in the spend ledger is written with its intent (`Money` defers it to `intent`)."""

    async def intent(self, record: Record, reservation: Reservation | None = None) -> Record | None:
        import psycopg
        from psycopg_pool import PoolTimeout

        from .errors import FluxError, SpendRefused

        if record.idempotency_key:  # the key's job, written here and not yet in the database
            pending = next((r for r in self._backlog.values() if r.principal == record.principal
                            and r.idempotency_key == record.idempotency_key), None)
            if pending is not None:
                return pending.copy()
        row = list(_row(record))
        row[_STATUS] = "submitting"
        args: tuple[Any, ...] = (*row, self.owner, self.lease_seconds, record.id)
        try:
            if reservation is not None and reservation.check is not None:
                async with self._reserving, self.pool.connection() as conn, conn.transaction():
                    # The ledger's lock first (as `reserve`): no other reservation between the sums and the insert.
                    await conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LEDGER_LOCK,))
                    charge = reservation.charge
                    totals = await _totals(conn, charge.principal, reservation.since)
                    totals.update({EVERYONE + k: v for k, v in (await _totals(conn, None, reservation.since)).items()})
                    refusal = reservation.check(totals)
                    if refusal is not None:
                        raise SpendRefused(refusal)
                    held, landed = await self._intend(conn, record, _INTENT_CHARGED, (*args, *_charge_row(charge)))
            else:
                async with self.pool.connection() as conn:
                    held, landed = await self._intend(
                        conn, record, _INTENT if reservation is None else _INTENT_CHARGED,
                        args if reservation is None else (*args, *_charge_row(reservation.charge)))
            if held is not None:
                return held
        except (psycopg.Error, PoolTimeout) as exc:
            raise FluxError(f"The database {self.where} cannot record the job before it is sent "
                            f"({_first_line(exc)}), so nothing was sent and nothing was charged. Call again "
                            "in a moment.") from None
        if not landed:  # the key's job went between the two statements (pruned): never send without an intent
            raise FluxError("Another call with this idempotency_key is being recorded right now; nothing was sent. "
                            "Call again to get that job.")
        self._held[record.id] = 0
        return None

    @staticmethod
    async def _intend(conn: AsyncConnection[Any], record: Record, sql: str, args: tuple[Any, ...]
                      ) -> tuple[Record | None, bool]:
        """The intent's statement: (the job that holds the record's key, or None; whether the intent landed)."""
        cur = await conn.execute(sql, args)
        if await cur.fetchone() is not None:
            return None, True
        if record.idempotency_key:
            cur = await conn.execute(f"{_SELECT} WHERE principal = %s AND idempotency_key = %s",
                                     (record.principal, record.idempotency_key))
            held = await cur.fetchone()
            if held is not None:
                return _record(held), False
        return None, False

    async def intent_failed(self, intent_id: str, error: str | None) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        self._held.pop(intent_id, None)
        try:
            async with self.pool.connection() as conn:
                if error is None:
                    await conn.execute("DELETE FROM flux_predictions WHERE id = %s AND native_id = ''", (intent_id,))
                else:
                    await conn.execute(_NOTIFY.format(
                        f"UPDATE flux_predictions SET status = 'unknown', error = %s, completed_at = {_NOW}, "
                        f"updated_at = {_NOW}, lease_owner = NULL, lease_until = NULL "
                        f"WHERE id = %s AND native_id = '' RETURNING id"), (error, intent_id))
        except (psycopg.Error, PoolTimeout) as exc:  # the reconciler turns it into `unknown` once its lease lapses
            log.warning("intent %s not updated (%s)", intent_id, _first_line(exc))
        self.waits.wake(intent_id)

    async def submitted(self, intent_id: str, record: Record, bill: Bill | None = None) -> bool:
        self._held.pop(intent_id, None)
        self._intents[record.id] = intent_id  # until it lands: a retried write from the backlog replaces it too
        if bill is not None:
            self._bills[record.id] = bill  # written with the record (also when retried from the backlog)
        return await self.put(record)

    async def _replace_intent(self, intent_id: str, record: Record) -> None:
        bill = self._bills.get(record.id)
        args: tuple[Any, ...] = (intent_id, *_row(record), self.owner, self.lease_seconds, intent_id)
        if bill is not None:
            args += (bill.prediction_id, bill.usd, bill.usd, time.time(), bill.charge_id)
        async with self.pool.connection() as conn:
            cur = await conn.execute(_SUBMITTED if bill is None else _SUBMITTED_BILLED, args)
            row = await cur.fetchone()
        self._intents.pop(record.id, None)
        self._bills.pop(record.id, None)
        epoch, was = (int(row[0]), row[1]) if row else (0, None)
        self._held[record.id] = epoch
        if was == "unknown":
            log.warning("%s: the provider's answer came after the job was reported unknown; the job continues",
                        record.id)
        if _done(record) or was == "unknown":
            self.waits.wake(intent_id)

    async def claim(self, prediction_id: str) -> Record | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(_CLAIM, (self.owner, self.lease_seconds, prediction_id))
            row = await cur.fetchone()
        if row is None:
            return None
        self._held[prediction_id] = int(row[0])
        return _record(row[1:])

    async def claim_lapsed(self, limit: int) -> list[Record]:
        """The reconciler's claim: up to `limit` pending jobs whose lease lapsed, now held here (epoch + 1)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(_CLAIM_LAPSED, (limit, self.owner, self.lease_seconds))
            rows = await cur.fetchall()
        claimed = []
        for row in rows:
            rec = _record(row[1:])
            self._held[rec.id] = int(row[0])
            claimed.append(rec)
        return claimed

    async def expire_intents(self, looking: Sequence[str] = ()) -> tuple[list[str], list[Record]]:
        """Intents whose replica's lease lapsed: those of providers not in `looking` become `unknown` (never
        resubmitted), the others are held here (epoch + 1) to look for their jobs in the provider's history
        (then `settle_intent`). Returns the ids made unknown, and the intents now held."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(_EXPIRE_INTENTS, (list(looking), UNKNOWN_ERROR, self.owner, self.lease_seconds))
            rows = await cur.fetchall()
        gave_up = [str(r[1]) for r in rows if r[0] is None]
        for rid in gave_up:
            self.waits.wake(rid)
        held = []
        for row in rows:
            if row[0] is not None:
                intent = _record(row[1:])
                self._held[intent.id] = int(row[0])
                held.append(intent)
        return gave_up, held

    async def intent_rivals(self, provider: str, since: float, intents: Sequence[str],
                            native_ids: Sequence[str]) -> tuple[list[Record], set[str]]:
        """For a history lookup: the provider's other intents and `unknown` intents created since `since` (any of
        them may have made a job the history shows), and which of `native_ids` the journal already holds."""
        rows = await self._fetch(_RIVALS, (provider, since, list(intents), [f"{provider}:{n}" for n in native_ids]))
        records = [_record(r) for r in rows]
        return [r for r in records if not r.native_id], {r.native_id for r in records if r.native_id}

    async def settle_intent(self, intent: Record, native_id: str | None, error: str) -> Record | None:
        """A held intent's lookup ended: with `native_id` the intent becomes that job (held here at the same epoch,
        its charge billed) and the job is returned; without (or when that write cannot land: the lease moved on,
        the id is taken) it becomes `unknown` with `error`, and None is returned."""
        epoch = self._held.pop(intent.id, None)
        if epoch is None:
            return None
        if native_id is not None:
            job = intent.copy()
            charge = job.request.pop("charge_id", None)
            job.id, job.native_id, job.status, job.updated_at = f"{intent.provider}:{native_id}", native_id, \
                "starting", time.time()
            rows = await self._fetch(_FOUND, (intent.id, self.owner, epoch, job.id, *_row(job), self.owner,
                                              self.lease_seconds, intent.id, job.id, time.time(), charge))
            if rows:
                self._held[job.id] = epoch
                self.waits.wake(intent.id)
                return job
        async with self.pool.connection() as conn:
            await conn.execute(_GIVE_UP, (error, intent.id, self.owner, epoch))
        self.waits.wake(intent.id)
        return None

    async def adopt(self, principal: str, request_key: str, since: float,
                    skip: Sequence[str] = ()) -> tuple[Record, bool] | None:
        """The job a key-less re-issue of a call (same principal, same `request_key`, created at or after `since`)
        attaches to instead of paying again, and whether this call adopted it (`adopted_at` set: no other
        re-issue gets it). Orphans first (jobs taken over from a replica that stopped), oldest first, claimed
        with FOR UPDATE SKIP LOCKED so two re-issues of two cut calls adopt two different jobs; then any
        other job of the call whose answer never reached its caller. A job whose submit has no recorded
        answer (an intent, or an `unknown` job: the provider may or may not have made it) is not adoptable:
        it carries no provider id, so there is nothing to wait on that could bring images; it is answered
        (joined, any number of times) only when nothing could be adopted, so such a re-issue reports it
        rather than paying again. `skip`: ids not to take (a call here still waits on them)."""
        since_args = (principal, request_key, since, self._not_delivered(skip))
        rows = await self._fetch(_ADOPT, (*since_args, *since_args))
        if not rows:
            pending = next((r for r in self._backlog.values() if r.principal == principal and not r.delivered
                            and r.request_key == request_key and r.created_at >= since and r.id not in skip
                            and r.id not in self._delivered), None)
            return None if pending is None else (pending.copy(), False)
        best = max(rows, key=lambda r: bool(r[-1]))
        return _record(best[:-1]), bool(best[-1])

    async def unadopt(self, prediction_id: str) -> None:
        """The adopting call ended without its answer (cancelled): the job is free for the next re-issue."""
        import psycopg
        from psycopg_pool import PoolTimeout

        try:
            async with self.pool.connection() as conn:
                await conn.execute("UPDATE flux_predictions SET adopted_at = NULL WHERE id = %s", (prediction_id,))
        except (psycopg.Error, PoolTimeout) as exc:  # it stays adopted: a further re-issue then starts a new job
            log.info("adoption of %s not undone: %s", prediction_id, _first_line(exc))

    async def heartbeat(self) -> int:
        """Renews every lease this replica holds, in one statement; returns how many rows it renewed."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(_HEARTBEAT, (self.lease_seconds, self.owner))
            return cur.rowcount

    async def end_leases(self) -> int:
        """A stopping replica's leases end now, so other replicas take its jobs over at once."""
        self._held.clear()
        async with self.pool.connection() as conn:
            cur = await conn.execute(_END_LEASES, (self.owner,))
            return cur.rowcount

    async def hand_over_jobs(self) -> int:
        """A stopping replica's submitted pending jobs go to the other replicas now (its intents keep their
        leases, renewed by the heartbeat, until their submits are answered); returns how many."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(_HAND_OVER_JOBS, (self.owner,))
            return cur.rowcount

    async def release(self, prediction_id: str, *, hand_over: bool = False) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        epoch = self._held.pop(prediction_id, None)
        if epoch is None:
            return
        try:
            async with self.pool.connection() as conn:
                await conn.execute(_HAND_OVER if hand_over else _RELEASE, (prediction_id, self.owner, epoch))
        except (psycopg.Error, PoolTimeout) as exc:  # the lease lapses by itself; another replica then takes it
            log.info("lease of %s not released (%s)", prediction_id, _first_line(exc))

    def forget(self, prediction_id: str) -> None:
        """A finished job's lease needs no statement: nobody claims a final job."""
        self._held.pop(prediction_id, None)

    def holds(self, prediction_id: str) -> bool:
        return prediction_id in self._held

    async def watch(self, prediction_id: str) -> tuple[Record, bool] | None:
        pending = self._backlog.get(prediction_id)
        if pending is not None:
            return pending.copy(), True
        rows = await self._fetch(_SELECT_LEASE, (prediction_id, prediction_id))
        return (self._marked(_record(rows[0][:-1])), bool(rows[0][-1])) if rows else None

    async def changed(self, prediction_id: str, timeout: float) -> None:
        await self.waits.wait(prediction_id, timeout)

    async def ping(self) -> None:
        """Raises unless the database answers a trivial query (the readiness check)."""
        async with self.pool.connection(timeout=2.0) as conn:
            await conn.execute("SELECT 1")

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
        if self._delivering is not None:
            self._delivering.cancel()
            self._delivering = None
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._writing, self._write_delivered())
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._retrier
        if self._backlog:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_backlog(), 5.0)
        for rid in self.unwritten():
            log.error("prediction %s was never written to the database %s (%s); keep its id to check on it "
                      "with the provider", rid, self.where, self._backlog_reason)
        await self.pool.close()


async def _totals(conn: AsyncConnection[Any], principal: str | None, since: Mapping[str, float]) -> dict[str, Totals]:
    out: dict[str, Totals] = {}
    for name, start in since.items():
        cur = await (conn.execute(_SUM_ALL, (start,)) if principal is None
                     else conn.execute(_SUM_CHARGES, (principal, start)))
        row = await cur.fetchone()
        usd, images = row if row else (0, 0)
        out[name] = Totals(float(usd), int(images))
    return out


def _transient() -> tuple[type[BaseException], ...]:
    """Write failures that pass (the database unreachable or restarting, the pool exhausted, a failover that
    left a read-only standby or a role without rights for a while): the record is kept and retried."""
    import psycopg
    from psycopg import errors
    from psycopg_pool import PoolTimeout

    return (psycopg.OperationalError, psycopg.InterfaceError, errors.ReadOnlySqlTransaction,
            errors.InsufficientPrivilege, PoolTimeout)


def _kept() -> tuple[type[BaseException], ...]:
    """Every write failure of a record: kept in the backlog and retried, never raised (as on SQLite). Besides
    the passing ones this is a record that breaks a constraint (another job of the caller already holds its
    idempotency key): it waits in the backlog, and later versions queue behind it, until it can land."""
    import psycopg

    return (*_transient(), psycopg.Error)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
