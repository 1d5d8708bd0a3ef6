"""The gallery of a shared server, over real HTTP on PostgreSQL + S3: a person logs in with a one-time link
their assistant asked for, sees only their own images, and the full images come from the bucket."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.browser import ARTIFACTS, CHROMIUM, LAUNCH_ARGS, ensure_chromium
from tests.conftest import ATLAS_KEY, pg_env, text_of
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


@pytest.fixture(scope="session")
def chromium() -> str:
    problem = ensure_chromium()
    if problem:
        pytest.skip(problem)
    return str(CHROMIUM)


@contextlib.asynccontextmanager
async def as_user(url: str, token: str) -> AsyncIterator[Client]:
    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http, \
            Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
        yield client


@contextlib.contextmanager
def two_replicas(fake, shared_env: dict[str, str], home: Path, workspace: Path):
    env = child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url,
                    FLUX_MCP_AUTH_TOKENS=f"alice:{ALICE},bob:{BOB}", **shared_env)
    with http_server("streamable-http", env, workspace) as (one, _), \
            http_server("streamable-http", env, workspace) as (two, _):
        yield one, two


async def jobs_and_link(one: str, two: str) -> tuple[str, str, str]:
    """Alice's job (made on one replica), Bob's (on the other), and Alice's gallery login link."""
    async with as_user(one, ALICE) as alice:
        mine = await alice.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
    async with as_user(two, BOB) as bob:
        theirs = await bob.call_tool("generate_image", {"prompt": "an owl in the rain"})
    async with as_user(one, ALICE) as alice:
        link = await alice.call_tool("create_gallery_link", {})
    assert not link.is_error and "/gallery/login/" in text_of(link), text_of(link)
    return (mine.structured_content["prediction_id"], theirs.structured_content["prediction_id"],
            link.structured_content["url"])


@pytest.mark.browser
async def test_a_person_logs_in_with_a_link_and_sees_only_their_images_from_the_bucket(
        fake, shared_env, home: Path, workspace: Path, chromium: str, cluster_services):
    from playwright.async_api import async_playwright

    _, s3 = cluster_services
    errors: list[str] = []
    answered: list[tuple[str, int]] = []
    with two_replicas(fake, shared_env, home, workspace) as (one, two):
        mine, theirs, link = await jobs_and_link(one, two)
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
            try:
                context = await browser.new_context()
                page = await context.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("requestfailed", lambda req: errors.append(f"{req.url} failed"))
                page.on("response", lambda r: answered.append((r.url, r.status)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                # The link names the replica that made it; the other one logs the person in just as well.
                await page.goto(link.replace(one, two))
                await page.click("#open")
                await page.wait_for_url(f"{two}/gallery/")
                card = page.locator(".card")
                await card.first.wait_for(timeout=15_000)
                await page.wait_for_function("() => { const i = document.querySelector('.card .thumb img');"
                                             " return i && i.complete && i.naturalWidth > 0; }", timeout=15_000)
                assert await card.count() == 1 and await card.first.get_attribute("data-id") == mine
                await card.first.click()
                await page.wait_for_function("() => { const i = document.querySelector('dialog[open] #full');"
                                             " return i && i.complete && i.naturalWidth > 0; }", timeout=15_000)
                download = await page.locator("dialog[open] #download").get_attribute("href")
                text = await page.locator("body").inner_text()
                ARTIFACTS.mkdir(exist_ok=True)
                await page.screenshot(path=str(ARTIFACTS / "gallery-shared.png"))
                cookies = await context.cookies()
                # The same login link a second time: spent.
                again = await (await browser.new_context()).new_page()
                spent = await again.goto(link)
            finally:
                await browser.close()
        session = next(c for c in cookies if c["name"] == "flux_gallery")
        async with httpx2.AsyncClient(cookies={"flux_gallery": session["value"]}) as http:
            other = await http.get(f"{one}/gallery/api/predictions/{theirs}")
            own = await http.get(f"{one}/gallery/api/predictions/{mine}")
            thumb = await http.get(f"{one}/gallery/thumb/{theirs}/0")
        async with httpx2.AsyncClient() as http:
            anonymous = await http.get(f"{one}/gallery/api/predictions")
            page_without = await http.get(f"{one}/gallery/")
            forged = await http.get(f"{one}/gallery/api/predictions",
                                    headers={"Cookie": "flux_gallery=" + "A" * 43})
    # The full image is the bucket's, through a presigned link; no location on the server is shown.
    assert (f"{two}/gallery/image/{mine.replace(':', '%3A')}/0", 303) in answered
    assert [u for u, status in answered if u.startswith(s3.endpoint) and "X-Amz-Signature=" in u and status == 200]
    assert download and download.startswith(s3.endpoint)
    assert "s3://" not in text and str(home) not in text and "a lighthouse at dusk" in text
    assert session["httpOnly"] and session["path"] == "/gallery" and session["sameSite"] == "Lax"
    assert spent is not None and spent.status == 410
    # Another person's job is not there for this session, as if it did not exist.
    assert other.status_code == 404 and thumb.status_code == 404
    assert own.status_code == 200 and own.json()["images"][0]["path"] is None
    assert own.json()["images"][0]["download"].startswith(s3.endpoint)
    assert anonymous.status_code == 401 and forged.status_code == 401
    assert page_without.status_code == 401 and "create_gallery_link" in page_without.text
    assert errors == []


async def test_a_login_link_works_once_and_the_assistants_token_does_not_open_the_gallery(fake, shared_env, home: Path,
                                                                          workspace: Path):
    with two_replicas(fake, shared_env, home, workspace) as (one, two):
        _, _, link = await jobs_and_link(one, two)
        async with httpx2.AsyncClient() as http:
            looked = [await http.get(link), await http.get(link)]  # a link preview's fetch spends nothing
            foreign = await http.post(link, headers={"Origin": "https://evil.example"})
            first = await http.post(link)
            second = await http.post(link)
            after = await http.get(link)
        async with httpx2.AsyncClient() as http:  # no cookie jar from the login above
            with_token = await http.get(f"{one}/gallery/api/predictions",
                                        headers={"Authorization": f"Bearer {ALICE}"})
    assert [r.status_code for r in looked] == [200, 200] and 'method="post"' in looked[0].text
    assert "set-cookie" not in looked[0].headers and foreign.status_code == 403
    assert first.status_code == 303 and first.headers["location"] == "/gallery/"
    assert "flux_gallery=" in first.headers["set-cookie"] and "HttpOnly" in first.headers["set-cookie"]
    assert second.status_code == 410 and after.status_code == 410
    assert with_token.status_code == 401  # the gallery is the person's: a cookie, not the assistant's token
