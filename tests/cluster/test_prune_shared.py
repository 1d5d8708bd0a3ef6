"""Retention in shared mode (PostgreSQL + S3): `flux-mcp prune` and the prune at start remove old finished and
`unknown` jobs with their objects, release reservations no job can bill any more, drop old upload-URL rows and
upload-link / gallery objects past their lifetime; never a pending job's row, and `--dry-run` removes nothing."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest

from flux_mcp.backends import open_store
from flux_mcp.config import Settings
from flux_mcp.gallery.remote import Logins
from flux_mcp.jobs import Outcome
from flux_mcp.journal import Charge, Record
from flux_mcp.journal_pg import PgJournal
from flux_mcp.paths import PathPolicy
from flux_mcp.prune import prune
from flux_mcp.request import JobRequest
from flux_mcp.service import FluxService
from flux_mcp.store_s3 import S3Store
from flux_mcp.uploads import Uploads
from tests.conftest import ATLAS_BASE, ATLAS_KEY, FAST_RETRY, pg_env
from tests.fakes.atlascloud import AtlasFake
from tests.subprocess_helpers import child_env, flux_command

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]
DAY = 86_400.0


@dataclass
class History:
    journal: PgJournal
    store: S3Store
    jobs: dict[str, Record]
    reservations: dict[str, str]
    objects: dict[str, list[str]]
    """'old' and 'fresh' upload-link and gallery objects."""


async def count(journal: PgJournal, sql: str, *args: Any) -> int:
    return int((await journal._fetch(sql, args))[0][0])


@pytest.fixture
def env(request: pytest.FixtureRequest) -> dict[str, str]:
    return pg_env(request)


@pytest.fixture
async def history(env: dict[str, str], tmp_path: Path) -> AsyncIterator[History]:
    """Jobs (an old finished one, a recent one, an old pending one, an old `unknown` one), reservations (an
    old orphaned one, a fresh one), upload-URL rows and link objects, old and fresh."""
    settings = Settings.from_env({"FLUX_MCP_HOME": str(tmp_path / "home"), "ATLASCLOUD_API_KEY": ATLAS_KEY,
                                  "ATLASCLOUD_BASE_URL": ATLAS_BASE, **env}, cwd=tmp_path)
    fake = AtlasFake(key=ATLAS_KEY)
    journal = await PgJournal.open(env["FLUX_MCP_DATABASE_URL"])
    store = open_store(settings)
    assert isinstance(store, S3Store)
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle))
    service = FluxService(settings, http, journal, store=store, retry=FAST_RETRY)
    paths = PathPolicy([], settings.home)
    try:
        jobs: dict[str, Record] = {}
        for name in ("old", "recent"):
            out = await service.run(JobRequest(prompt=name), paths, principal="alice")
            assert isinstance(out, Outcome) and out.record.status == "succeeded" and out.record.images
            jobs[name] = out.record
        fake.hold = True
        pending = await service.run(JobRequest(prompt="pending", wait_seconds=0), paths, principal="alice")
        assert isinstance(pending, Outcome) and pending.record.status not in ("succeeded", "failed")
        jobs["pending"] = pending.record
        intent = Record(id="atlascloud:intent-0001", provider="atlascloud", native_id="", model="m",
                        kind="generate", status="starting", request={"prompt": "cut"}, principal="alice")
        assert await journal.intent(intent) is None
        await journal.intent_failed(intent.id, "the replica stopped before the answer")  # now `unknown`
        jobs["unknown"] = intent
        old = time.time() - 40 * DAY
        async with journal.pool.connection() as conn:
            await conn.execute("UPDATE flux_predictions SET created_at = %s, updated_at = %s WHERE id = ANY(%s)",
                               (old, old, [jobs[n].id for n in ("old", "pending", "unknown")]))
        reservations = {"old": "charge-old", "fresh": "charge-fresh"}
        await journal.reserve(Charge(id="charge-old", principal="alice", provider="atlascloud", model="m", images=1,
                                     usd=0.5, created_at=old, updated_at=old), {}, None)
        await journal.reserve(Charge(id="charge-fresh", principal="alice", provider="atlascloud", model="m",
                                     images=1, usd=0.5), {}, None)
        await journal.add_upload("a" * 64, "atlascloud", "https://files.example/old.png")
        async with journal.pool.connection() as conn:
            await conn.execute("UPDATE flux_uploads SET created_at = %s", (old,))
        await journal.add_upload("b" * 64, "atlascloud", "https://files.example/fresh.png")
        objects: dict[str, list[str]] = {"old": [], "fresh": []}
        for age, clock in (("old", lambda: time.time() - 2 * DAY), ("fresh", time.time)):
            before = {n for n, _ in await store.list_objects("uploads/") + await store.list_objects("gallery/")}
            await Uploads(store, clock).create("alice")
            link, _ = await Logins(store, clock).create("alice")
            await Logins(store, clock).log_in(link)  # spent, with a session
            after = {n for n, _ in await store.list_objects("uploads/") + await store.list_objects("gallery/")}
            objects[age] = sorted(after - before)
        assert len(objects["old"]) == 4 and len(objects["fresh"]) == 4  # ticket; login, used; session
        yield History(journal, store, jobs, reservations, objects)
    finally:
        await journal.close()
        await http.aclose()


async def test_prune_on_postgres_and_s3_removes_what_is_old_or_expired_and_never_a_pending_job(history: History):
    journal, store, jobs = history.journal, history.store, history.jobs
    old_images = [i.path or "" for i in jobs["old"].images]
    preview = await prune(journal, store, older_than_days=30, dry_run=True)
    assert sorted(preview.predictions) == sorted([jobs["old"].id, jobs["unknown"].id])
    assert preview.files == old_images and preview.reservations == 1 and preview.upload_urls == 1
    assert sorted(preview.objects) == history.objects["old"]
    # a dry run removes nothing
    assert await journal.get(jobs["old"].id) is not None and all([await store.present(p) for p in old_images])
    assert await count(journal, "SELECT count(*) FROM flux_charges WHERE state = 'reserved'") == 2
    billed = await count(journal, "SELECT count(*) FROM flux_charges WHERE state <> 'reserved'")
    assert len(await store.list_objects("uploads/") + await store.list_objects("gallery/")) == 8

    done = await prune(journal, store, older_than_days=30)
    assert sorted(done.predictions) == sorted(preview.predictions) and done.files == old_images
    assert done.reservations == 1 and done.upload_urls == 1 and sorted(done.objects) == history.objects["old"]
    assert await journal.get(jobs["old"].id) is None and await journal.get(jobs["unknown"].id) is None
    assert not [p for p in old_images if await store.present(p)]
    assert await journal.get(jobs["pending"].id) is not None  # 40 days old, but pending
    recent = await journal.get(jobs["recent"].id)
    assert recent is not None and all([await store.present(i.path) for i in recent.images])
    reserved = await journal._fetch("SELECT id FROM flux_charges WHERE state = 'reserved'", ())
    assert [r[0] for r in reserved] == ["charge-fresh"]  # and the jobs' own charges stay: money spent
    assert await count(journal, "SELECT count(*) FROM flux_charges WHERE state <> 'reserved'") == billed == 3
    assert await count(journal, "SELECT count(*) FROM flux_uploads") == 1
    left = sorted(n for n, _ in await store.list_objects("uploads/") + await store.list_objects("gallery/"))
    assert left == history.objects["fresh"]
    again = await prune(journal, store, older_than_days=30)
    assert not (again.predictions or again.files or again.reservations or again.upload_urls or again.objects)


async def test_flux_mcp_prune_command_works_on_the_shared_backends(history: History, env: dict[str, str],
                                                                 tmp_path: Path):
    child = child_env(tmp_path / "cli-home", **env)
    dry = subprocess.run(flux_command("prune", "--older-than", "30", "--dry-run"), env=child, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert await history.journal.get(history.jobs["old"].id) is not None
    real = subprocess.run(flux_command("prune", "--older-than", "30"), env=child, capture_output=True, text=True,
                          timeout=60)
    assert real.returncode == 0, real.stderr
    assert "would remove 2 prediction(s)" in dry.stderr and "removed 2 prediction(s)" in real.stderr
    assert "released 1 reservation(s)" in real.stderr and "4 upload/gallery object(s)" in real.stderr
    assert await history.journal.get(history.jobs["old"].id) is None
    assert await history.journal.get(history.jobs["pending"].id) is not None
