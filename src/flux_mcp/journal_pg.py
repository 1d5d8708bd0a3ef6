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
* **The spend ledger** (`flux_charges`) is written in transactions of its own: a reservation takes a
  transaction-level advisory lock for its principal, sums, and inserts, so two replicas never both spend
  the last dollar. Its writes raise `LedgerUnavailable` when they cannot land (a budget fails closed).
* **`delivered` only goes from false to true**, whatever order the versions of a record land in.
* **Pooler-safe:** no server-side prepared statements (`prepare_threshold=None`), so the URL may point
  at PgBouncer in transaction mode.

Times are kept as epoch seconds (double precision) exactly as `Record` holds them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .journal import (
    _CHARGE_COLUMNS,
    _COLUMNS,
    EVERYONE,
    RECENT,
    Charge,
    ChargeState,
    JournalUnusable,
    LedgerUnavailable,
    Record,
    Search,
    Totals,
)
from .models import ImageOutput

if TYPE_CHECKING:
    from psycopg import AsyncConnection
    from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("flux_mcp.journal")

SCHEMA_VERSION = 2
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
}

R = TypeVar("R")
_LEDGER_LOCK = 0x666C7579  # serialises every reservation across replicas (the server's budgets span principals)

_INSERT = (f"INSERT INTO flux_predictions ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
           f"ON CONFLICT (id) DO UPDATE SET "
           f"{', '.join(f'{c} = EXCLUDED.{c}' for c in _COLUMNS if c not in ('id', 'delivered'))}, "
           "delivered = flux_predictions.delivered OR EXCLUDED.delivered")
"""An upsert; `delivered` only ever goes from false to true (a late write of an older copy cannot undo it)."""
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM flux_predictions"


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
    data["images"] = [ImageOutput(**i) for i in data["images"]]
    data["delivered"] = bool(data["delivered"])
    data["cost_estimated"] = bool(data["cost_estimated"])
    return Record(**data)


_INSERT_CHARGE = (f"INSERT INTO flux_charges ({', '.join(_CHARGE_COLUMNS)}) "
                  f"VALUES ({', '.join(['%s'] * len(_CHARGE_COLUMNS))})")
_SUM_CHARGES = ("SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(images), 0) FROM flux_charges WHERE principal = %s "
                "AND created_at >= %s")
_SUM_ALL = "SELECT COALESCE(SUM(usd), 0), COALESCE(SUM(images), 0) FROM flux_charges WHERE created_at >= %s"


def _charge_row(c: Charge) -> tuple[Any, ...]:
    return (c.id, c.principal, c.provider, c.model, c.images, c.usd, c.estimated, c.state, c.prediction_id,
            c.created_at, c.updated_at)


def _charge(row: Sequence[Any]) -> Charge:
    return Charge(id=row[0], principal=row[1], provider=row[2], model=row[3], images=int(row[4]), usd=row[5],
                  estimated=bool(row[6]), state=row[7], prediction_id=row[8], created_at=row[9], updated_at=row[10])


def _search_sql(search: Search, limit: int) -> tuple[str, tuple[Any, ...]]:
    """`Search` as PostgreSQL: each word must appear in the prompt, both lower-cased (the SQLite journal
    folds with Python's casefold; the two differ only for a few letters such as the German sharp s)."""
    where: list[str] = []
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

    def __init__(self, pool: AsyncConnectionPool[AsyncConnection[Any]], where: str):
        self.pool = pool
        self.where = where
        self._recent: dict[tuple[str, str], tuple[float, list[tuple[str, float]]]] = {}
        self._backlog: dict[str, Record] = {}
        self._backlog_reason: str | None = None
        self._retrier: asyncio.Task[None] | None = None
        self._closed = False

    @classmethod
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0) -> PgJournal:
        """Connects (waiting up to `timeout` for the database), migrates, and checks the layout."""
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
        journal = cls(pool, where)
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

    async def put(self, record: Record) -> bool:
        self._remember_duration(record)
        if record.id not in self._backlog and not self._backlog:
            try:
                await self._write(record)
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
        async with self.pool.connection() as conn:
            await conn.execute(_INSERT, _row(record))

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
        return _record(rows[0]) if rows else None

    async def typical_duration(self, provider: str, model: str) -> float | None:
        import psycopg
        from psycopg_pool import PoolTimeout

        key = (provider, model)
        cached = self._recent.get(key)
        if cached is None or time.monotonic() - cached[0] >= _RECENT_TTL:
            try:
                rows = await self._fetch(
                    "SELECT id, completed_at - created_at FROM flux_predictions WHERE provider = %s AND model = %s "
                    "AND status = 'succeeded' AND completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT %s",
                    (provider, model, RECENT))
            except (psycopg.Error, PoolTimeout) as exc:
                log.info("durations not read: %s", _first_line(exc))
                rows = []
            cached = (time.monotonic(), [(r[0], r[1]) for r in rows if r[1] is not None and r[1] >= 0])
            self._recent[key] = cached
        durations = [d for _, d in cached[1]]
        return statistics.median(durations) if len(durations) >= 2 else None

    def _remember_duration(self, rec: Record) -> None:
        if rec.status != "succeeded" or rec.completed_at is None or rec.completed_at < rec.created_at:
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
        rows = await self._fetch(f"{_SELECT} WHERE status IN ('succeeded', 'failed', 'canceled') AND updated_at < %s "
                                 "ORDER BY updated_at LIMIT %s", (before, limit))
        return [_record(r) for r in rows]

    async def remove(self, prediction_ids: list[str], uploads_before: float | None = None) -> int:
        async with self.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM flux_predictions WHERE id = ANY(%s) AND status IN ('succeeded', "
                                     "'failed', 'canceled')", (list(prediction_ids),))
            removed = cur.rowcount
            if uploads_before is not None:
                await conn.execute("DELETE FROM flux_uploads WHERE created_at < %s", (uploads_before,))
        return removed

    async def rejoinable(self, principal: str, request_key: str, since: float) -> list[Record]:
        pending = [r.copy() for r in self._backlog.values() if r.principal == principal
                   and r.request_key == request_key and not r.delivered and r.created_at >= since]
        rows = await self._fetch(f"{_SELECT} WHERE principal = %s AND request_key = %s AND NOT delivered AND "
                                 "created_at >= %s ORDER BY created_at DESC LIMIT 5", (principal, request_key, since))
        found = {r.id: r for r in [*(_record(row) for row in rows), *pending]}
        return sorted(found.values(), key=lambda r: r.created_at, reverse=True)

    async def by_idempotency_key(self, principal: str, key: str) -> Record | None:
        pending = next((r.copy() for r in self._backlog.values()
                        if r.principal == principal and r.idempotency_key == key), None)
        if pending is not None:
            return pending
        rows = await self._fetch(f"{_SELECT} WHERE principal = %s AND idempotency_key = %s", (principal, key))
        return _record(rows[0]) if rows else None

    async def mark_delivered(self, prediction_id: str) -> None:
        import psycopg
        from psycopg_pool import PoolTimeout

        pending = self._backlog.get(prediction_id)
        if pending is not None:
            pending.delivered = True
            return
        try:
            async with self.pool.connection() as conn:
                await conn.execute("UPDATE flux_predictions SET delivered = TRUE WHERE id = %s", (prediction_id,))
        except (psycopg.Error, PoolTimeout) as exc:  # losing it only means a later identical call may join this job
            log.info("delivery of %s not recorded: %s", prediction_id, _first_line(exc))

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
                      check: Callable[[Mapping[str, Totals]], R | None]) -> R | None:
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

        result: R | None = await self._ledger(work)
        return result

    async def totals(self, principal: str | None, since: Mapping[str, float]) -> dict[str, Totals]:
        async def work(conn: AsyncConnection[Any]) -> dict[str, Totals]:
            return await _totals(conn, principal, since)

        result: dict[str, Totals] = await self._ledger(work, "read")
        return result

    async def update_charge(self, charge_id: str, state: ChargeState, prediction_id: str | None = None) -> None:
        async def work(conn: AsyncConnection[Any]) -> None:
            await conn.execute("UPDATE flux_charges SET state = %s, prediction_id = COALESCE(%s, prediction_id), "
                               "updated_at = %s WHERE id = %s", (state, prediction_id, time.time(), charge_id))

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

    async def ping(self) -> None:
        """Raises unless the database answers a trivial query (the readiness check)."""
        async with self.pool.connection(timeout=2.0) as conn:
            await conn.execute("SELECT 1")

    # --- closing ------------------------------------------------------------------------------

    async def close(self) -> None:
        self._closed = True
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
