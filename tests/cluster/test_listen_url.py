"""FLUX_MCP_LISTEN_DATABASE_URL: each replica's LISTEN connection goes to its own URL (behind PgBouncer in
transaction mode, the database itself), the pool keeps FLUX_MCP_DATABASE_URL, and wake-ups across replicas
still arrive; the pool never prepares statements on the server (a transaction pooler cannot keep them)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import httpx2
import pytest

from flux_mcp.backends import open_journal, open_store
from flux_mcp.config import Settings
from flux_mcp.jobs import Outcome
from flux_mcp.journal_pg import PgJournal
from flux_mcp.paths import PathPolicy
from flux_mcp.replica import Replica
from flux_mcp.request import JobRequest
from flux_mcp.service import FluxService
from tests.conftest import ATLAS_BASE, ATLAS_KEY, FAST_RETRY, pg_env
from tests.fakes.atlascloud import AtlasFake

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]


@pytest.fixture
def shared_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return pg_env(request)


def named(url: str, app: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}application_name={app}"


@pytest.fixture
def make_node(shared_env: dict[str, str], tmp_path: Path, fake: AtlasFake
              ) -> Callable[..., contextlib.AbstractAsyncContextManager[tuple[FluxService, Replica]]]:
    @contextlib.asynccontextmanager
    async def make(listen_app: str | None = None) -> AsyncIterator[tuple[FluxService, Replica]]:
        env = {"FLUX_MCP_HOME": str(tmp_path / "home"), "ATLASCLOUD_API_KEY": ATLAS_KEY,
               "ATLASCLOUD_BASE_URL": ATLAS_BASE, **shared_env}
        if listen_app:
            env["FLUX_MCP_LISTEN_DATABASE_URL"] = named(shared_env["FLUX_MCP_DATABASE_URL"], listen_app)
        settings = Settings.from_env(env, cwd=tmp_path)
        journal = await open_journal(settings)
        assert isinstance(journal, PgJournal)
        http = httpx2.AsyncClient(transport=httpx2.MockTransport(fake.handle))
        service = FluxService(settings, http, journal, store=open_store(settings), retry=FAST_RETRY)
        replica = Replica(journal, service.runner, service.providers, PathPolicy([], settings.home))
        await replica.start()
        try:
            with anyio.fail_after(10):
                await replica.listening.wait()
            yield service, replica
        finally:
            await replica.stop()
            await journal.close()
            await http.aclose()

    return make


@pytest.fixture
def fake() -> AtlasFake:
    return AtlasFake(key=ATLAS_KEY, hold=True)


async def sessions(journal: PgJournal, app: str) -> list[str]:
    rows = await journal._fetch("SELECT query FROM pg_stat_activity WHERE application_name = %s", (app,))
    return [str(r[0]) for r in rows]


async def test_the_listen_connection_goes_to_its_own_url_and_wakeups_still_arrive(make_node, fake: AtlasFake):
    async with make_node() as (a, _), make_node("flux-listen-b") as (b, replica_b):
        journal_b = b.journal
        assert isinstance(journal_b, PgJournal)
        listening = await sessions(journal_b, "flux-listen-b")
        assert len(listening) == 1 and listening[0].upper().startswith("LISTEN")  # b's one LISTEN session
        assert await sessions(journal_b, replica_b.listen_name) == []  # not on the default URL's name
        paths = PathPolicy([], a.settings.home)
        started = await a.run(JobRequest(prompt="a red fox", wait_seconds=0), paths, principal="alice")
        assert isinstance(started, Outcome)
        pid = started.record.id
        woken = anyio.Event()

        async def wait_on_b() -> None:
            await journal_b.changed(pid, 60)  # only a notification (or a write on b, none here) wakes this
            woken.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_on_b)
            fake.finish(next(iter(fake.jobs)))
            done = await a.check(pid, 10, paths, principal="alice")  # a drives it to the end: NOTIFY
            with anyio.fail_after(10):
                await woken.wait()
        seen = await b.check(pid, 0, paths, principal="alice")
    assert done.record.status == seen.record.status == "succeeded" and seen.record.images


async def test_the_pool_never_prepares_statements_on_the_server(make_node):
    async with make_node() as (service, _):
        journal = service.journal
        assert isinstance(journal, PgJournal)
        async with journal.pool.connection() as conn:
            for _ in range(12):  # psycopg would prepare a statement run this often, were it allowed to
                await conn.execute("SELECT id FROM flux_predictions WHERE id = %s", ("atlascloud:none",))
            cur = await conn.execute("SELECT count(*) FROM pg_prepared_statements")
            row = await cur.fetchone()
    assert row is not None and row[0] == 0


def test_a_listen_url_that_is_not_postgres_is_refused_at_start(tmp_path: Path):
    from flux_mcp.errors import ConfigError

    with pytest.raises(ConfigError, match="FLUX_MCP_LISTEN_DATABASE_URL"):
        Settings.from_env({"FLUX_MCP_HOME": str(tmp_path), "FLUX_MCP_DATABASE_URL": "postgresql://db/flux",
                           "FLUX_MCP_LISTEN_DATABASE_URL": "mysql://db/flux"}, cwd=tmp_path)
