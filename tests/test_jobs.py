"""The job runner on its own (no MCP): submit once -> journal -> wait -> settle -> keep, and what
happens to a paid job's id when the journal cannot be written."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest

from flux_mcp.config import Settings
from flux_mcp.http import ProviderHttp
from flux_mcp.jobs import JobRunner
from flux_mcp.journal import SCHEMA_VERSION, JournalUnusable, Record, SqliteJournal, open_journal
from flux_mcp.keep import Keeper, SavePlan
from flux_mcp.media import Downloader
from flux_mcp.paths import PathPolicy
from flux_mcp.providers.atlascloud import AtlasCloud
from flux_mcp.redact import Redactor
from flux_mcp.request import JobRequest
from flux_mcp.store import FolderStore
from flux_mcp.waiting import Pacer
from tests.conftest import ATLAS_KEY, FAST_RETRY
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio
SCHNELL = "black-forest-labs/flux-schnell"


def fill_the_disk(journal: SqliteJournal) -> None:
    """SQLite's own "database or disk is full": the file may not grow, and every free byte is taken."""
    with journal._lock:
        db = journal._db
        db.execute(f"PRAGMA max_page_count={db.execute('PRAGMA page_count').fetchone()[0]}")
        for size in (3000, 300, 30, 1):
            for n in range(10_000):
                try:
                    db.execute("INSERT INTO predictions (id, provider, native_id, model, kind, status, request,"
                               " created_at, updated_at) VALUES (?, 'fill', 'x', 'm', 'generate', 'failed', ?, 0, 0)",
                               (f"fill:{size}-{n}", "z" * size))
                except sqlite3.OperationalError as exc:
                    assert "full" in str(exc)
                    break


@dataclass
class Rig:
    runner: JobRunner
    journal: SqliteJournal
    provider: AtlasCloud
    fake: AtlasFake
    paths: PathPolicy
    home: Path

    def request(self, **kw: object) -> JobRequest:
        return self.provider.prepare(JobRequest(prompt="a lighthouse", provider="atlascloud", model=SCHNELL,
                                                **kw))  # type: ignore[arg-type]

    async def row(self, prediction_id: str) -> Record | None:
        """The record as a second reader of the file sees it (not the journal's in-memory backlog)."""
        other = open_journal(self.home)
        try:
            with other._lock:
                row = other._db.execute("SELECT id FROM predictions WHERE id=?", (prediction_id,)).fetchone()
            return await other.get(prediction_id) if row else None
        finally:
            await other.close()


@pytest.fixture
async def rig(make_settings, workspace: Path, home: Path) -> AsyncIterator[Rig]:
    settings: Settings = make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                                       ATLASCLOUD_SYNC_MODE="off")
    fake = AtlasFake(key=ATLAS_KEY)
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle))
    redactor = Redactor(settings.secrets())
    journal = open_journal(home)
    store = FolderStore(home)
    provider = AtlasCloud(settings.providers["atlascloud"],
                          ProviderHttp(client, "atlascloud", redactor, key_env="ATLASCLOUD_API_KEY", retry=FAST_RETRY))
    runner = JobRunner(journal, store, Keeper(store, Downloader(client)), redactor)
    try:
        yield Rig(runner, journal, provider, fake, PathPolicy([workspace], home), home)
    finally:
        await journal.close()
        await client.aclose()


async def test_a_polled_job_is_submitted_once_journaled_waited_on_and_its_image_kept(rig: Rig):
    outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 30, rig.paths)
    record = outcome.record
    assert record.status == "succeeded" and len(rig.fake.ledger) == 1
    assert record.images and Path(record.images[0].path or "").is_file()
    assert Path(record.images[0].path or "").is_relative_to(rig.home / "images")
    stored = await rig.row(record.id)
    assert stored is not None and stored.status == "succeeded" and stored.images == record.images


async def steady_jobs(rig: Rig, n: int) -> list[int]:
    """Runs `n` jobs one after another; the status requests the provider received for each."""
    asked = []
    for _ in range(n):
        outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 30, rig.paths)
        assert outcome.record.status == "succeeded"
        asked.append(rig.fake.jobs[outcome.record.native_id].polls)
    return asked


async def test_a_steady_models_jobs_cost_at_most_1_3_status_requests_and_teach_where_they_end(rig: Rig):
    rig.runner.pacer = Pacer(polite_period=0.2)  # half-second jobs are paced as the longer ones of real providers
    rig.fake.duration = 0.45
    await steady_jobs(rig, 2)  # the first jobs: the model is learned from them
    asked = await steady_jobs(rig, 20)
    assert sum(asked) / len(asked) <= 1.3
    assert asked.count(1) >= 14 and 2 in asked  # most are asked once; some probed before the job was due
    learned = await rig.journal.typical_duration("atlascloud", SCHNELL)
    assert learned is not None and 0.45 <= learned <= 0.45 + 0.1 + 0.05  # within a gap of where the jobs end
    other = open_journal(rig.home)  # another process sharing the file learns the same
    try:
        assert await other.typical_duration("atlascloud", SCHNELL) == pytest.approx(learned)
    finally:
        await other.close()


async def test_the_learned_duration_follows_jobs_that_get_slower(rig: Rig):
    rig.runner.pacer = Pacer(polite_period=0.2)
    rig.fake.duration = 0.45
    await steady_jobs(rig, 6)
    before = await rig.journal.typical_duration("atlascloud", SCHNELL)
    assert before is not None and before < 0.6
    rig.fake.duration = 0.8
    await steady_jobs(rig, 14)  # each is seen running when it was expected done, and teaches where it ended
    after = await rig.journal.typical_duration("atlascloud", SCHNELL)
    assert after is not None and 0.8 <= after <= 1.1


async def test_the_job_is_journaled_before_the_wait_begins(rig: Rig):
    rig.fake.hold = True
    outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 0, rig.paths)
    assert outcome.record.status in ("starting", "processing")
    stored = await rig.row(outcome.record.id)
    assert stored is not None and stored.native_id in rig.fake.jobs


async def test_a_cancelled_wait_leaves_the_job_journaled_and_a_check_finishes_it(rig: Rig):
    rig.fake.hold = True
    with anyio.move_on_after(5) as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(rig.runner.run, rig.provider, rig.request(), SavePlan(), 60, rig.paths)
            while not rig.fake.ledger:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert not scope.cancelled_caught
    [job_id] = rig.fake.jobs
    stored = await rig.row(f"atlascloud:{job_id}")
    assert stored is not None and stored.status == "starting"
    rig.fake.finish(job_id)
    done = await rig.runner.check(stored, rig.provider, 5, rig.paths)
    assert done.record.status == "succeeded" and Path(done.record.images[0].path or "").is_file()
    assert len(rig.fake.ledger) == 1


async def test_a_cancel_during_the_submit_still_journals_the_job(rig: Rig):
    rig.fake.duration = None
    entered = anyio.Event()
    real = rig.fake.handle

    async def slow_submit(request: httpx2.Request) -> httpx2.Response:
        if request.method == "POST":
            entered.set()
            await anyio.sleep(0.2)  # the submit is in flight when the call is cancelled
        return await real(request)

    rig.fake.handle = slow_submit  # type: ignore[method-assign]
    client = httpx2.AsyncClient(transport=httpx2.MockTransport(slow_submit))
    rig.provider.http.client = client
    async with anyio.create_task_group() as tg:
        tg.start_soon(rig.runner.run, rig.provider, rig.request(), SavePlan(), 60, rig.paths)
        await entered.wait()
        tg.cancel_scope.cancel()
    await client.aclose()
    [job_id] = rig.fake.jobs
    assert await rig.row(f"atlascloud:{job_id}") is not None


async def test_a_full_journal_after_the_submit_leaves_the_id_in_the_result_and_the_log(rig: Rig, caplog):
    rig.fake.hold = True
    fill_the_disk(rig.journal)
    with caplog.at_level(logging.INFO, logger="flux_mcp"):
        outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 0, rig.paths)
    [job_id] = rig.fake.jobs
    pid = f"atlascloud:{job_id}"
    assert outcome.record.id == pid
    assert any(pid in n and "journal" in n for n in outcome.notes), outcome.notes
    assert pid in caplog.text and "not yet journaled" in caplog.text
    # Still found: from the journal's backlog (or from the file, once its retry, on a connection of its own
    # that the full-disk limit of this one does not bind, has landed it).
    assert (await rig.journal.get(pid)) is not None


async def test_a_lock_held_by_another_connection_neither_blocks_the_loop_nor_loses_the_id(rig: Rig, caplog):
    rig.fake.hold = True
    other = sqlite3.connect(rig.home / "journal.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock until the test lets go
    try:
        with caplog.at_level(logging.INFO, logger="flux_mcp"), anyio.fail_after(5):
            outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 0, rig.paths)
        pid = outcome.record.id
        assert pid in caplog.text and rig.journal.unwritten() == [pid]
        assert any(pid in n for n in outcome.notes)
    finally:
        other.execute("ROLLBACK")
        other.close()
    with anyio.fail_after(10):  # the journal's retry lands the record once the lock is gone
        while rig.journal.unwritten():
            await anyio.sleep(0.05)
    stored = await rig.row(pid)
    assert stored is not None and stored.native_id in rig.fake.jobs


async def test_a_journal_migrated_by_a_newer_version_mid_run_keeps_the_id(rig: Rig, caplog):
    rig.fake.hold = True
    other = sqlite3.connect(rig.home / "journal.sqlite3", isolation_level=None)
    other.execute("ALTER TABLE predictions DROP COLUMN remaining_credits")  # what a newer layout might do
    other.close()
    with caplog.at_level(logging.INFO, logger="flux_mcp"):
        outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 0, rig.paths)
    pid = outcome.record.id
    assert pid in caplog.text and any(pid in n for n in outcome.notes)
    assert await rig.journal.get(pid) is not None


async def test_later_versions_of_an_unwritten_record_land_in_order(rig: Rig):
    rig.fake.hold = True
    other = sqlite3.connect(rig.home / "journal.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    outcome = await rig.runner.run(rig.provider, rig.request(), SavePlan(), 0, rig.paths)
    [job_id] = rig.fake.jobs
    rig.fake.finish(job_id)
    done = await rig.runner.check(outcome.record, rig.provider, 5, rig.paths)  # written behind the first
    assert done.record.status == "succeeded"
    other.execute("ROLLBACK")
    other.close()
    with anyio.fail_after(10):
        while rig.journal.unwritten():
            await anyio.sleep(0.05)
    stored = await rig.row(done.record.id)
    assert stored is not None and stored.status == "succeeded" and stored.images


@pytest.mark.parametrize("change", [
    "PRAGMA user_version=99",
    "ALTER TABLE predictions ADD COLUMN tenant TEXT NOT NULL DEFAULT 'x'",
    "ALTER TABLE predictions DROP COLUMN error",
])
async def test_a_journal_this_version_cannot_write_is_refused_at_start_naming_the_folder(home: Path, change: str):
    await open_journal(home).close()
    db = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    db.execute(change)
    db.close()
    if "DEFAULT" in change:
        # A column with a default does not stop this version writing its rows: still usable.
        await open_journal(home).close()
        return
    with pytest.raises(JournalUnusable) as caught:
        open_journal(home)
    assert str(home) in str(caught.value) and "FLUX_MCP_HOME" in str(caught.value)
    assert "\n" not in str(caught.value)


async def test_a_required_column_unknown_to_this_version_is_refused(home: Path):
    db = sqlite3.connect(home.mkdir(parents=True) or home / "journal.sqlite3", isolation_level=None)
    db.executescript("CREATE TABLE predictions (id TEXT PRIMARY KEY, provider TEXT NOT NULL, native_id TEXT NOT NULL,"
                     " model TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL, request TEXT NOT NULL,"
                     " images TEXT NOT NULL DEFAULT '[]', outputs TEXT NOT NULL DEFAULT '[]', error TEXT,"
                     " cost_usd REAL, remaining_credits REAL, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
                     " completed_at REAL, tenant TEXT NOT NULL);")
    db.close()
    with pytest.raises(JournalUnusable, match="tenant"):
        open_journal(home)


async def test_an_older_journal_without_a_version_is_migrated_and_keeps_its_rows(home: Path):
    home.mkdir(parents=True)
    db = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    from flux_mcp.journal import _MIGRATIONS

    db.executescript(_MIGRATIONS[1])  # the layout that journals had before versions existed
    db.execute("INSERT INTO predictions (id, provider, native_id, model, kind, status, request, created_at,"
               " updated_at) VALUES ('atlascloud:old', 'atlascloud', 'old', 'm', 'generate', 'succeeded', '{}', 1, 1)")
    db.close()
    journal = open_journal(home)
    try:
        record = await journal.get("atlascloud:old")
        assert record is not None and record.status == "succeeded"
        with journal._lock:
            assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        await journal.close()


async def test_a_file_that_is_not_a_database_is_one_clear_error(home: Path):
    home.mkdir(parents=True)
    (home / "journal.sqlite3").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalUnusable) as caught:
        open_journal(home)
    assert str(home) in str(caught.value)


def test_servers_starting_at_once_on_an_old_journal_migrate_it_once(home: Path):
    home.mkdir(parents=True)
    db = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    from flux_mcp.journal import _MIGRATIONS

    db.executescript(_MIGRATIONS[1])
    db.execute("PRAGMA user_version=1")
    db.close()
    import threading

    errors: list[BaseException] = []
    opened: list[SqliteJournal] = []

    def start() -> None:
        try:
            opened.append(open_journal(home))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(opened) == 4
    for journal in opened:
        with journal._lock:
            assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            journal._db.close()


async def test_a_later_write_of_an_older_copy_never_undelivers_and_a_clashing_key_deletes_nothing(home: Path):
    journal = open_journal(home)
    try:
        first = Record(id="atlascloud:a", provider="atlascloud", native_id="a", model="m", kind="generate",
                       status="succeeded", request={}, idempotency_key="k", delivered=True)
        assert await journal.put(first)
        stale = first.copy()
        stale.delivered = False
        assert await journal.put(stale)
        stored = await journal.get("atlascloud:a")
        assert stored is not None and stored.delivered  # once delivered, always delivered
        clash = Record(id="atlascloud:b", provider="atlascloud", native_id="b", model="m", kind="generate",
                       status="starting", request={}, idempotency_key="k")
        assert not await journal.put(clash)  # the key belongs to the first job: not written over it
        with journal._lock:
            assert journal._db.execute("SELECT id FROM predictions").fetchall() == [("atlascloud:a",)]
    finally:
        await journal.close()


async def test_an_older_journal_migrates_to_the_open_jobs_index_and_still_finds_a_cut_call(home: Path):
    """Schema 6: the rejoin lookup's index holds only jobs whose answer never reached the caller. A journal
    written by schema 5 (the index of every job) migrates with its rows; a caller who repeated one request
    fifty times still finds the one call that was cut, and the lookup reads only the open jobs."""
    from flux_mcp.journal import _MIGRATIONS

    home.mkdir(parents=True)
    db = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    for step in range(1, 6):
        db.executescript(_MIGRATIONS[step])
    db.execute("PRAGMA user_version=5")
    now = time.time()
    columns = ("id, provider, native_id, model, kind, status, request, created_at, updated_at, completed_at, "
               "principal, request_key, delivered")
    for i in range(50):
        db.execute(f"INSERT INTO predictions ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   (f"atlascloud:d{i}", "atlascloud", f"d{i}", "m", "generate", "succeeded", "{}", now - 100 + i,
                    now, now, "local", "same-request", 1))
    db.execute(f"INSERT INTO predictions ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
               ("atlascloud:cut", "atlascloud", "cut", "m", "generate", "succeeded", "{}", now - 120, now, now,
                "local", "same-request", 0))
    db.close()

    journal = open_journal(home)
    try:
        with journal._lock:
            assert journal._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            names = {r[0] for r in journal._db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
            open_rows = journal._db.execute("SELECT count(*) FROM predictions INDEXED BY predictions_open "
                                            "WHERE delivered = 0").fetchone()[0]
        assert "predictions_open" in names and "predictions_rejoin" not in names
        assert open_rows == 1, "the index holds the undelivered job only"
        found = await journal.rejoinable("local", "same-request", now - 600)
        assert [r.id for r in found] == ["atlascloud:cut"]
        assert await journal.get("atlascloud:d7") is not None, "the migration kept the rows"
        await journal.mark_delivered("atlascloud:cut")
        assert await journal.rejoinable("local", "same-request", now - 600) == []
    finally:
        await journal.close()


async def test_committed_jobs_reach_the_journal_file_beside_the_loop(home: Path, tmp_path: Path):
    """The checkpointer thread copies committed pages from the WAL into the journal file while the loop only
    commits: a copy of the file alone (no WAL) soon holds every job written, though far fewer pages were written
    than the 1,000 at which a commit would checkpoint by itself."""
    import shutil

    journal = open_journal(home)
    try:
        for i in range(30):
            await journal.put(Record(id=f"atlascloud:c{i}", provider="atlascloud", native_id=f"c{i}", model="m",
                                     kind="generate", status="succeeded", request={"prompt": "p"}))

        def rows_in_file_alone() -> int:
            copy = tmp_path / f"copy-{time.monotonic_ns()}.sqlite3"
            shutil.copyfile(home / "journal.sqlite3", copy)  # the WAL left behind: only what was checkpointed
            db = sqlite3.connect(copy)
            try:
                return int(db.execute("SELECT count(*) FROM predictions").fetchone()[0])
            except sqlite3.DatabaseError:
                return -1
            finally:
                db.close()

        with anyio.fail_after(10):
            while rows_in_file_alone() != 30:
                await anyio.sleep(0.05)
        with journal._lock:
            assert journal._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] > 1000
    finally:
        await journal.close()
