"""Shared mode end to end: replicas of the real command on one PostgreSQL database and one bucket, users
told apart by their tokens, inputs and outputs that never name the server's disk, health routes."""

from __future__ import annotations

import base64
import contextlib
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from flux_mcp.config import Settings
from flux_mcp.journal_pg import SCHEMA_VERSION, PgJournal
from tests.conftest import ATLAS_KEY, connect, pg_env, text_of
from tests.fakes.wire import png_bytes
from tests.subprocess_helpers import child_env, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]
ALICE = "alice-token-3b9f0c1e7a5d-9c4e2b8a6d1f7e3c"
BOB = "bob-token-8e2d4a6c0f1b-5a7c9e1d3b6f8a2e4c"


@pytest.fixture
def shared_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return pg_env(request)


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@contextlib.asynccontextmanager
async def as_user(url: str, token: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
            yield client


async def test_a_job_made_on_one_replica_is_answered_by_another_only_to_its_own_user(
        fake, shared_env, home: Path, workspace: Path, cluster_services):
    pg, s3 = cluster_services
    env = child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url,
                    FLUX_MCP_AUTH_TOKENS=f"alice:{ALICE},bob:{BOB}", **shared_env)
    with http_server("streamable-http", env, workspace) as (one, _), \
            http_server("streamable-http", env, workspace) as (two, _):
        async with as_user(one, ALICE) as alice:
            made = await alice.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
        data = made.structured_content
        assert data["status"] == "succeeded", text_of(made)
        pid = data["prediction_id"]
        async with as_user(two, ALICE) as alice:
            again = await alice.call_tool("check_prediction", {"prediction_id": pid})
        async with as_user(two, BOB) as bob:
            stranger = await bob.call_tool("check_prediction", {"prediction_id": pid})
            unknown = await bob.call_tool("check_prediction", {"prediction_id": "atlascloud:pred_nosuchjob"})
            with pytest.raises(Exception, match="No prediction"):
                await bob.read_resource(f"flux://predictions/{pid}")
        async with httpx2.AsyncClient() as http:
            link = again.structured_content["images"][0]["url"]
            download = await http.get(link)
    # Answered by the second replica from the shared database and bucket, with a fresh download link.
    assert again.structured_content["status"] == "succeeded" and not again.is_error
    assert "X-Amz-Signature=" in link and download.status_code == 200
    assert download.content.startswith(b"\x89PNG") and link in text_of(again)
    previews = [b for b in again.content if getattr(b, "type", "") == "image"]
    assert previews and base64.b64decode(previews[0].data) == download.content
    # Another user's id is answered exactly like an id that does not exist.
    assert stranger.is_error and unknown.is_error
    assert text_of(stranger).replace(pid, "ID") == text_of(unknown).replace("atlascloud:pred_nosuchjob", "ID")
    schema = shared_env["FLUX_MCP_DATABASE_URL"].rpartition("%3D")[2]
    database = shared_env["FLUX_MCP_DATABASE_URL"].rpartition("/")[2].partition("?")[0]
    assert pg.psql(f"SELECT principal FROM {schema}.flux_predictions", database) == "alice"
    assert len(fake.ledger) == 1
    # Shared mode polls Atlas Cloud instead of holding the submit open (a held submit has no id to recover).
    assert any(r.startswith("GET /api/v1/model/prediction/") for r in fake.requests)


async def test_health_routes_answer_without_a_token_and_the_mcp_endpoint_does_not(
        fake, shared_env, home: Path, workspace: Path):
    env = child_env(home, FLUX_MCP_AUTH_TOKENS=f"alice:{ALICE}", **shared_env)
    with http_server("streamable-http", env, workspace) as (url, _):
        async with httpx2.AsyncClient() as http:
            with anyio.fail_after(20):
                while (ready := await http.get(f"{url}/readyz")).status_code != 200:
                    await anyio.sleep(0.1)
            health = await http.get(f"{url}/healthz")
            denied = await http.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert ready.json() == {"status": "ready", "database": "ok", "bucket": "ok"}
    assert denied.status_code == 401 and ALICE not in denied.text


async def test_readyz_says_unready_when_the_bucket_is_gone(fake, shared_env, home: Path, workspace: Path):
    env = child_env(home, **{**shared_env, "FLUX_MCP_S3_URL": "s3://no-such-bucket-here"})
    with http_server("streamable-http", env, workspace) as (url, _):
        async with httpx2.AsyncClient() as http:
            with anyio.fail_after(20):
                while (ready := await http.get(f"{url}/readyz")).json().get("status") == "starting":
                    await anyio.sleep(0.1)
    assert ready.status_code == 503
    assert ready.json()["database"] == "ok" and ready.json()["bucket"].startswith("unreachable")


def test_a_token_list_with_a_bad_entry_is_refused_at_start_without_showing_tokens(home: Path, workspace: Path):
    from tests.subprocess_helpers import flux_command

    env = child_env(home, FLUX_MCP_AUTH_TOKENS=f"alice:{ALICE},bob:short")
    proc = subprocess.run(flux_command("serve", "--transport", "streamable-http"), env=env, cwd=workspace,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "FLUX_MCP_AUTH_TOKENS entry 2 (bob)" in proc.stderr
    assert ALICE not in proc.stderr and "short" not in proc.stderr


# --- inputs and outputs (in memory, on the shared backends) ----------------------------------------------

@pytest.fixture
def shared_settings(make_settings: Callable[..., Settings], shared_env: dict[str, str]) -> Callable[..., Settings]:
    def make(**env: str) -> Settings:
        return make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL="http://atlas.test",
                             **{**shared_env, **env})
    return make


async def test_save_to_and_server_paths_are_refused_before_paying_with_what_to_do_instead(
        shared_settings, fake, workspace: Path):
    (workspace / "logo.png").write_bytes(png_bytes(20, 20))
    async with connect(shared_settings(), fake) as client:
        saved = await client.call_tool("generate_image", {"prompt": "p", "save_to": "img/hero.png"})
        local = await client.call_tool("edit_image", {"prompt": "make it blue", "image": "logo.png"})
        upload = await client.call_tool("upload_media", {"path": "logo.png"})
    assert saved.is_error and "images[].url" in text_of(saved)
    assert local.is_error and "data: URI" in text_of(local)
    assert upload.is_error and "edit_image" in text_of(upload) and "data: URI" in text_of(upload)
    assert fake.ledger == [] and not any(r.startswith("POST") for r in fake.requests)
    assert not (workspace / "img").exists()


async def test_edit_image_takes_a_data_uri_and_a_url_in_shared_mode(shared_settings, fake):
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(20, 20)).decode()
    async with connect(shared_settings(), fake) as client:
        inline = await client.call_tool("edit_image", {"prompt": "make it blue", "image": uri})
        linked = await client.call_tool("edit_image", {"prompt": "make it red",
                                                       "image": "https://example.test/cat.png"})
    assert inline.structured_content["status"] == "succeeded", text_of(inline)
    assert linked.structured_content["status"] == "succeeded", text_of(linked)
    assert inline.structured_content["images"][0]["path"].startswith("s3://")


async def test_atlas_sync_mode_is_off_in_shared_mode_unless_asked(shared_settings, fake):
    async with connect(shared_settings(), fake) as client:
        await client.call_tool("generate_image", {"prompt": "p"})
    polled = list(fake.requests)
    fake.requests.clear()
    async with connect(shared_settings(ATLASCLOUD_SYNC_MODE="auto"), fake) as client:
        await client.call_tool("generate_image", {"prompt": "p"})
    assert any("/prediction/" in r for r in polled)
    assert fake.requests == ["POST /api/v1/model/generateImage"]


# --- the database ----------------------------------------------------------------------------------

async def test_three_replicas_migrating_at_once_migrate_once(shared_env):
    url = shared_env["FLUX_MCP_DATABASE_URL"]
    journals: list[PgJournal] = []

    async def start() -> None:
        journals.append(await PgJournal.open(url))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(start)
    try:
        async with journals[0].pool.connection() as conn:
            rows = await (await conn.execute("SELECT version FROM flux_schema")).fetchall()
        assert sorted(r[0] for r in rows) == list(range(1, SCHEMA_VERSION + 1))  # each step once
    finally:
        for j in journals:
            await j.close()


async def test_a_database_from_a_newer_flux_mcp_is_refused_at_start(shared_env):
    from flux_mcp.journal import JournalUnusable

    url = shared_env["FLUX_MCP_DATABASE_URL"]
    journal = await PgJournal.open(url)
    async with journal.pool.connection() as conn:
        await conn.execute("INSERT INTO flux_schema (version) VALUES (99)")
    await journal.close()
    with pytest.raises(JournalUnusable, match="newer flux-mcp"):
        await PgJournal.open(url)


async def test_many_waiting_calls_hold_no_database_connection(shared_settings, fake):
    fake.hold = True
    async with connect(shared_settings(), fake) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0})
        pid = pending.structured_content["prediction_id"]
        results: list[Any] = []

        async def wait() -> None:
            results.append(await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 30}))

        with anyio.fail_after(25):
            async with anyio.create_task_group() as tg:
                for _ in range(40):  # four times the pool
                    tg.start_soon(wait)
                await anyio.sleep(0.5)
                # With forty calls waiting, a new job is still journaled at once.
                other = await client.call_tool("generate_image", {"prompt": "q", "wait_seconds": 0})
                assert not other.is_error and "journal could not be written" not in text_of(other)
                fake.finish(pid.split(":", 1)[1])
    assert len(results) == 40 and all(r.structured_content["status"] == "succeeded" for r in results)


async def test_a_write_refused_by_a_read_only_database_is_kept_and_lands_once_it_is_writable(
        shared_env, cluster_services):
    pg, _ = cluster_services
    url = shared_env["FLUX_MCP_DATABASE_URL"]
    database = url.rpartition("/")[2].partition("?")[0]
    journal = await PgJournal.open(url)
    from tests.test_backends import record

    def reconnect_all() -> None:  # the pool's connections are dropped; new ones get the database's settings
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}' "
                "AND pid <> pg_backend_pid()")

    try:
        pg.psql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
        reconnect_all()
        rec = record(5)
        landed = False
        with anyio.fail_after(10):
            while not landed and not journal.unwritten():
                landed = await journal.put(rec)  # the first try may meet a dropped connection: tried again
        assert not landed and journal.unwritten() == [rec.id]
        assert await journal.get(rec.id) == rec  # found in the backlog meanwhile
        pg.psql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = off')
        reconnect_all()
        with anyio.fail_after(15):
            while journal.unwritten():
                await anyio.sleep(0.1)
        other = await PgJournal.open(url)
        try:
            assert await other.get(rec.id) == rec
        finally:
            await other.close()
    finally:
        pg.psql(f'ALTER DATABASE "{database}" SET default_transaction_read_only = off')
        await journal.close()
