"""A shared server's ways in and out for people on other machines, over real HTTP on PostgreSQL + S3:
upload links, per-user and per-server budgets, the gallery behind a one-time login link."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from flux_mcp.journal import Charge, Journal
from flux_mcp.journal_pg import PgJournal
from flux_mcp.uploads import MAX_BYTES, Uploads
from tests.conftest import ATLAS_KEY, pg_env, text_of
from tests.fakes.wire import png_bytes
from tests.subprocess_helpers import child_env, flux_command, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.cluster]
ALICE = "alice-token-3b9f0c1e7a5d-9c4e2b8a6d1f7e3c"
BOB = "bob-token-8e2d4a6c0f1b-5a7c9e1d3b6f8a2e4c"
TOKENS = f"alice:{ALICE},bob:{BOB}"


@pytest.fixture
def shared_env(request: pytest.FixtureRequest) -> dict[str, str]:
    return pg_env(request)


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@contextlib.asynccontextmanager
async def as_user(url: str, token: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http, \
            Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
        yield client


def server_env(home: Path, fake: Any, shared_env: dict[str, str], **extra: str) -> dict[str, str]:
    return child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url, FLUX_MCP_AUTH_TOKENS=TOKENS,
                     **shared_env, **extra)


# --- upload links -------------------------------------------------------------------------------------------

async def test_a_file_put_to_an_upload_link_is_edited_for_its_user_only(fake, shared_env, home: Path,
                                                                         workspace: Path):
    photo = png_bytes(48, 32)
    env = server_env(home, fake, shared_env)
    with http_server("streamable-http", env, workspace) as (one, _), \
            http_server("streamable-http", env, workspace) as (two, _):
        async with as_user(one, ALICE) as alice:
            made = await alice.call_tool("create_upload_link", {})
        link = made.structured_content
        async with httpx2.AsyncClient(timeout=30) as http:
            # What `curl -T photo.png URL` sends, to the other replica and without a token: the link is the key.
            put = await http.put(link["url"].replace(one, two), content=photo)
            again = await http.put(link["url"], content=photo)
        async with as_user(two, BOB) as bob:
            stolen = await bob.call_tool("edit_image", {"prompt": "make it blue", "image": link["image"]})
            unknown = await bob.call_tool("edit_image", {"prompt": "make it blue",
                                                         "image": "upload:" + "x" * 43})
        async with as_user(two, ALICE) as alice:
            edited = await alice.call_tool("edit_image", {"prompt": "make it blue", "image": link["image"]})
            by_url = await alice.call_tool("upload_media", {"path": link["url"]})
    assert not made.is_error and link["url"].startswith(f"{one}/uploads/") and link["image"].startswith("upload:")
    assert "curl -T" in text_of(made) and link["image"] in text_of(made)
    assert put.status_code == 201 and put.json()["image"] == link["image"] and put.json()["width"] == 48
    assert again.status_code == 409  # one use, on any replica
    assert edited.structured_content["status"] == "succeeded", text_of(edited)
    assert photo in fake.uploads.values()  # the provider received exactly the bytes the user PUT
    assert not by_url.is_error and by_url.structured_content["url"], text_of(by_url)
    # Another user's reference is answered exactly like one that never existed, before anything is paid.
    assert stolen.is_error and unknown.is_error and text_of(stolen) == text_of(unknown)
    assert len(fake.ledger) == 1


async def test_an_upload_link_takes_only_images_within_the_size_cap_and_no_paths(fake, shared_env, home: Path,
                                                                                 workspace: Path):
    env = server_env(home, fake, shared_env)
    with http_server("streamable-http", env, workspace) as (url, _):
        async with as_user(url, ALICE) as alice:
            link = (await alice.call_tool("create_upload_link", {})).structured_content["url"]
            listed = await alice.list_tools()
        async with httpx2.AsyncClient(timeout=60) as http:
            text = await http.put(link, content=b"#!/bin/sh\necho not an image\n")
            big = await http.put(link, content=b"\x89PNG" + b"\0" * MAX_BYTES)
            empty = await http.put(link, content=b"")
            fine = await http.put(link, content=png_bytes(16, 16))  # the refusals did not spend the link
            nowhere = await http.put(f"{url}/uploads/{'A' * 43}", content=png_bytes(16, 16))
            posted = await http.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert text.status_code == 415 and "PNG, JPEG, WebP or GIF" in text.json()["error"]
    assert big.status_code == 413 and empty.status_code == 400
    assert fine.status_code == 201 and nowhere.status_code == 404
    assert posted.status_code == 401  # the MCP endpoint still needs the token
    tools = {t.name: t for t in listed.tools}
    assert "create_upload_link" in tools and "create_gallery_link" in tools
    assert "upload:" in tools["upload_media"].input_schema["properties"]["path"]["description"]
    assert len(json.dumps(listed.model_dump(mode="json", by_alias=True, exclude_none=True),
                          separators=(",", ":"))) <= 6000


async def test_an_upload_link_expires_and_a_reference_outlives_it_by_a_day_only(shared_env):
    from flux_mcp.backends import open_store
    from flux_mcp.config import Settings
    from flux_mcp.errors import InvalidInput

    now = [1_000_000.0]
    store = open_store(Settings.from_env(shared_env))
    uploads = Uploads(store, clock=lambda: now[0])

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        yield data

    late_link, _ = await uploads.create("alice")
    link, _ = await uploads.create("alice")
    assert (await uploads.accept(link, chunks(png_bytes(8, 8)), None))[0] == 201
    now[0] += 601
    assert (await uploads.accept(late_link, chunks(png_bytes(8, 8)), None))[0] == 410
    assert await uploads.resolve(f"upload:{link}", "alice") == png_bytes(8, 8)
    now[0] += 86_400
    with pytest.raises(InvalidInput, match="over a day old"):
        await uploads.resolve(f"upload:{link}", "alice")


async def test_local_mode_lists_no_link_tools(make_settings):
    from tests.conftest import connect

    async with connect(make_settings()) as client:
        names = {t.name for t in (await client.list_tools()).tools}
    assert "create_upload_link" not in names and "create_gallery_link" not in names


# --- budgets per user and per server ------------------------------------------------------------------------

async def test_each_user_has_their_own_limit_and_the_server_limit_holds_across_both(
        fake, shared_env, home: Path, workspace: Path):
    # $0.003 a job: each user may spend $0.006 a day, the server $0.009 in all.
    env = server_env(home, fake, shared_env, FLUX_MCP_BUDGET_DAY_USD="0.009", FLUX_MCP_USER_BUDGET_DAY_USD="0.006")
    with http_server("streamable-http", env, workspace) as (one, _), \
            http_server("streamable-http", env, workspace) as (two, _):
        async with as_user(one, ALICE) as alice:
            first = [await alice.call_tool("generate_image", {"prompt": f"fox {i}"}) for i in range(3)]
        async with as_user(two, BOB) as bob:
            second = [await bob.call_tool("generate_image", {"prompt": f"owl {i}"}) for i in range(2)]
        with anyio.fail_after(60):
            spend = await anyio.run_process(flux_command("spend"), env=env, cwd=workspace, check=False)
            report = json.loads((await anyio.run_process(flux_command("spend", "--json"), env=env, cwd=workspace,
                                                         check=False)).stdout)
    assert [r.is_error for r in first] == [False, False, True]
    assert "for alice: $0.006 of the FLUX_MCP_USER_BUDGET_DAY_USD limit of $0.006" in text_of(first[2])
    assert [r.is_error for r in second] == [False, True]
    assert "by all its users together: $0.009 of the FLUX_MCP_BUDGET_DAY_USD limit" in text_of(second[1])
    assert len(fake.ledger) == 3
    shown = spend.stdout.decode()
    assert spend.returncode == 0, spend.stderr
    assert "alice:" in shown and "bob:" in shown and "$0.006 of $0.006" in shown
    assert "all users together:" in shown and "$0.009 of $0.009" in shown
    people = {p["principal"]: p["today"]["usd"] for p in report["principals"]}
    assert people == {"alice": 0.006, "bob": 0.003} and report["server"]["today"]["usd"] == 0.009


async def test_two_users_racing_the_servers_last_dollar_on_two_replicas_get_it_once(
        fake, shared_env, home: Path, workspace: Path):
    env = server_env(home, fake, shared_env, FLUX_MCP_BUDGET_DAY_USD="0.009")
    with http_server("streamable-http", env, workspace) as (one, _), \
            http_server("streamable-http", env, workspace) as (two, _):
        async with as_user(one, ALICE) as alice:
            await alice.call_tool("generate_image", {"prompt": "warm-up"})
            await alice.call_tool("generate_image", {"prompt": "warm-up 2"})
        results: list[Any] = []

        async def call(url: str, token: str, n: int) -> None:
            async with as_user(url, token) as client:
                for i in range(n):
                    results.append(await client.call_tool("generate_image", {"prompt": f"race {token[:3]} {i}"}))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, one, ALICE, 2)
                tg.start_soon(call, two, BOB, 2)
    assert sorted(r.is_error for r in results) == [False, True, True, True]
    assert len(fake.ledger) == 3  # $0.009 exactly


async def test_the_ledger_lock_holds_every_principal_not_only_one(shared_env):
    """Two services on one database, two principals, a check slow enough that the other service's
    reservation runs between one's sums and its insert unless the lock spans principals."""
    url = shared_env["FLUX_MCP_DATABASE_URL"]
    first, second = await PgJournal.open(url), await PgJournal.open(url)
    start = time.time() - 1
    refusals: list[str] = []

    def slow(totals: Any) -> str | None:
        time.sleep(0.05)  # the other reservation gets its chance here
        return "over" if totals["all:day"].usd + 0.6 > 1.0 else None

    async def reserve(journal: Journal, who: str, i: int) -> None:
        charge = Charge(id=f"c{who}{i}", principal=who, provider="atlascloud", model="m", images=1, usd=0.6)
        refusal = await journal.reserve(charge, {"day": start}, slow)
        if refusal:
            refusals.append(refusal)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(reserve, first, "alice", i)
                tg.start_soon(reserve, second, "bob", i)
        assert len(refusals) == 5
        assert (await first.totals(None, {"day": start}))["day"].usd == pytest.approx(0.6)
    finally:
        await first.close()
        await second.close()


async def test_a_client_without_http_gets_no_link_and_is_told_why(make_settings, shared_env):
    from tests.conftest import connect

    async with connect(make_settings(**shared_env)) as client:
        upload = await client.call_tool("create_upload_link", {})
        gallery = await client.call_tool("create_gallery_link", {})
    assert upload.is_error and gallery.is_error
    assert "Connect over HTTP" in text_of(upload) and text_of(upload) == text_of(gallery)


async def test_a_shared_server_lists_no_parameter_it_refuses_and_says_why_when_one_is_sent(
        make_settings, shared_env, fake):
    from tests.conftest import ATLAS_BASE, connect

    dropped = {"save_to", "overwrite", "preset", "variation_of"}
    async with connect(make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE, **shared_env),
                       fake) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        preset = await client.call_tool("generate_image", {"prompt": "a fox logo", "preset": "favicon"})
        nulls = await client.call_tool("generate_image", {"prompt": "a fox", "save_to": None, "overwrite": False})
    async with connect(make_settings(ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=ATLAS_BASE), fake) as client:
        local = {t.name: t for t in (await client.list_tools()).tools}
    for name in ("generate_image", "edit_image"):
        assert not dropped & set(tools[name].input_schema["properties"])
        assert dropped - {"variation_of"} <= set(local[name].input_schema["properties"])
    assert preset.is_error and "preset writes its files under save_to" in text_of(preset)
    assert nulls.structured_content["status"] == "succeeded", text_of(nulls)  # an unset one is as if not sent
    assert len(fake.ledger) == 1
