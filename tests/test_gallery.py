"""The gallery: its JSON API and image routes, /gallery in the HTTP transports, and the page itself in
headless Chromium (thumbnails rendered, filters, the detail view, a pending job finishing by itself)."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from PIL import Image

from flux_mcp.gallery import Gallery
from flux_mcp.journal import open_journal
from flux_mcp.store import FolderStore
from flux_mcp.transport import http_app
from tests.browser import ARTIFACTS, CHROMIUM, LAUNCH_ARGS, ensure_chromium
from tests.conftest import ATLAS_KEY, connect
from tests.fakes.atlascloud import AtlasFake
from tests.subprocess_helpers import child_env

pytestmark = pytest.mark.anyio


async def make_journal(settings, fake: AtlasFake) -> dict[str, Any]:
    """Finished jobs on two providers (one with two images), a failed job and a pending one."""
    ids: dict[str, Any] = {}
    async with connect(settings, fake) as client:
        for name, args in {
            "fox": {"prompt": "A red fox in the snow", "provider": "placeholder"},
            "whale": {"prompt": "a blue whale, watercolour", "provider": "placeholder", "num_images": 2},
            "hero": {"prompt": "Hero banner: sunrise over hills", "provider": "atlascloud"},
        }.items():
            result = await client.call_tool("generate_image", args)
            assert result.structured_content["status"] == "succeeded", result.content
            ids[name] = result.structured_content["prediction_id"]
        fake.outcome = "fail"
        ids["failed"] = (await client.call_tool("generate_image", {"prompt": "a cursed lighthouse"})
                         ).structured_content["prediction_id"]
        fake.outcome, fake.hold = "ok", True
        ids["pending"] = (await client.call_tool("generate_image", {"prompt": "a castle on a cloud", "wait_seconds": 0})
                          ).structured_content["prediction_id"]
    ids["job"] = next(iter(reversed(fake.jobs)))
    return ids


@pytest.fixture
async def gallery(home: Path) -> AsyncIterator[Gallery]:
    g = Gallery(lambda: open_journal(home), FolderStore(home))
    yield g
    await g.aclose()


def client_for(app: Any, host: str = "127.0.0.1:8123") -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url=f"http://{host}")


# --- the API, without a browser -----------------------------------------------------------------------------

async def test_api_lists_filters_and_pages_the_journal(settings, fake, gallery):
    ids = await make_journal(settings, fake)
    async with client_for(gallery.app()) as http:
        everything = (await http.get("/api/predictions")).json()
        foxes = (await http.get("/api/predictions", params={"query": "FOX"})).json()
        placeholder = (await http.get("/api/predictions", params={"provider": "placeholder"})).json()
        pending = (await http.get("/api/predictions", params={"status": "pending"})).json()
        first = (await http.get("/api/predictions", params={"limit": 2})).json()
        rest = (await http.get("/api/predictions", params={"limit": 10, "before": first["next"]})).json()
        bad = await http.get("/api/predictions", params={"since": "whenever"})
    order = [ids[k] for k in ("pending", "failed", "hero", "whale", "fox")]
    assert [p["id"] for p in everything["predictions"]] == order
    assert [p["id"] for p in foxes["predictions"]] == [ids["fox"]]
    assert [p["id"] for p in placeholder["predictions"]] == [ids["whale"], ids["fox"]]
    assert [p["id"] for p in pending["predictions"]] == [ids["pending"]] and pending["predictions"][0]["pending"]
    assert [p["id"] for p in first["predictions"] + rest["predictions"]] == order and rest["next"] is None
    assert bad.status_code == 400 and "not a date" in bad.json()["error"]
    hero = everything["predictions"][2]
    assert hero["cost_usd"] == pytest.approx(0.003) and hero["images"][0]["width"] == 64
    assert ATLAS_KEY not in json.dumps(everything)


async def test_detail_carries_the_provenance_read_from_the_file(settings, fake, gallery):
    ids = await make_journal(settings, fake)
    async with client_for(gallery.app()) as http:
        whale = (await http.get(f"/api/predictions/{ids['whale']}")).json()
        failed = (await http.get(f"/api/predictions/{ids['failed']}")).json()
        missing = await http.get("/api/predictions/atlascloud:nope")
    assert len(whale["images"]) == 2
    for image in whale["images"]:
        assert image["provenance"]["prompt"] == "a blue whale, watercolour"
        assert image["provenance"]["prediction_id"] == ids["whale"] and image["on_disk"] is True
    assert failed["status"] == "failed" and failed["error"] and failed["images"] == []
    assert missing.status_code == 404


async def test_images_are_served_only_from_the_paths_the_journal_names(settings, fake, gallery, tmp_path: Path):
    ids = await make_journal(settings, fake)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG\r\n\x1a\nnot yours")
    async with client_for(gallery.app()) as http:
        image = await http.get(f"/image/{ids['fox']}/0")
        thumb = await http.get(f"/thumb/{ids['whale']}/1")
        again = await http.get(f"/thumb/{ids['whale']}/1")
        refused = [await http.get(path) for path in (
            f"/image/{ids['fox']}/1", f"/image/{ids['pending']}/0", f"/image/{ids['fox']}/-1",
            "/image/..%2F..%2F..%2Fetc%2Fpasswd/0", f"/image/{secret}/0", f"/thumb/{ids['failed']}/0",
            "/image/atlascloud:nope/0")]
    record = await (await gallery.journal()).get(ids["fox"])
    assert record is not None and image.content == Path(str(record.images[0].path)).read_bytes()
    assert image.headers["content-type"] == "image/png"
    assert thumb.headers["content-type"] == "image/webp" and again.content == thumb.content
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert im.format == "WEBP" and max(im.size) <= 512
    assert [r.status_code for r in refused] == [404] * len(refused)


async def test_a_page_from_another_host_name_gets_nothing(settings, fake, gallery):
    await make_journal(settings, fake)
    async with client_for(gallery.app(), host="attacker.example:8123") as http:
        page = await http.get("/")
        api = await http.get("/api/predictions")
    async with client_for(gallery.app(), host="localhost:8123") as http:
        ok = await http.get("/")
    assert page.status_code == 421 and api.status_code == 421 and "predictions" not in api.text
    assert ok.status_code == 200
    csp = ok.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce and f'<script nonce="{nonce.group(1)}">' in ok.text
    assert not re.search(r"""(src|href)=["']?https?:|url\(["']?https?:|@import""", ok.text)  # no external asset


async def test_gallery_is_served_by_the_http_transports_behind_the_same_token(settings, fake, make_settings):
    await make_journal(settings, fake)
    guarded = make_settings(FLUX_MCP_AUTH_TOKEN="gallery-token-5b1e8c2a9f4d7e1b3a6c0d9e")
    for transport in ("streamable-http", "sse"):
        async with client_for(http_app(guarded, transport, "127.0.0.1", 8123)) as http:
            anonymous = await http.get("/gallery/")
            wrong = await http.get("/gallery/api/predictions", headers={"Authorization": "Bearer nope"})
            page = await http.get("/gallery/", headers={"Authorization": "Bearer gallery-token-5b1e8c2a9f4d7e1b3a6c0d9e"})
            api = await http.get("/gallery/api/predictions", headers={"Authorization": "Bearer gallery-token-5b1e8c2a9f4d7e1b3a6c0d9e"})
        assert anonymous.status_code == 401 and wrong.status_code == 401
        assert page.status_code == 200 and "flux-mcp gallery" in page.text
        assert len(api.json()["predictions"]) == 5
    open_settings = make_settings()
    async with client_for(http_app(open_settings, "streamable-http", "127.0.0.1", 8123)) as http:
        local = await http.get("/gallery/api/predictions")
    async with client_for(http_app(open_settings, "streamable-http", "127.0.0.1", 8123), host="evil.example") as http:
        rebound = await http.get("/gallery/api/predictions")
    assert local.status_code == 200 and rebound.status_code == 421


# --- the page, in a real browser ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chromium() -> str:
    problem = ensure_chromium()
    if problem:
        pytest.skip(problem)
    return str(CHROMIUM)


@pytest.fixture
def gallery_command(home: Path) -> Iterator[str]:
    """`flux-mcp gallery --no-open` on a free port; yields the address it printed."""
    proc = subprocess.Popen([sys.executable, "-m", "flux_mcp", "gallery", "--no-open"], env=child_env(home),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline() if proc.stdout else ""), daemon=True)
    reader.start()
    reader.join(30)
    try:
        match = re.search(r"http://127\.0\.0\.1:\d+/", line[0] if line else "")
        assert match, f"no address printed: {line}"
        yield match.group(0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


SHOWN = "(ids) => [...document.querySelectorAll('.card')].map((c) => c.dataset.id).join() === ids.join()"
EVERY_THUMBNAIL_RENDERED = """() => {
  const imgs = [...document.querySelectorAll('.card .thumb img')];
  return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0);
}"""


@pytest.mark.browser
@pytest.mark.subprocess
async def test_the_gallery_in_a_browser(settings, fake, home: Path, chromium: str, gallery_command: str):
    from playwright.async_api import async_playwright

    ids = await make_journal(settings, fake)
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 860})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"{req.url} failed"))
            await page.goto(gallery_command)
            cards = page.locator(".card")
            await cards.nth(4).wait_for(timeout=15_000)
            assert await cards.count() == 5
            await page.wait_for_function(EVERY_THUMBNAIL_RENDERED, timeout=15_000)
            assert await page.locator(".card .thumb img").count() == 3  # fox, whale, hero; not failed or pending
            assert await page.locator(f'.card[data-id="{ids["failed"]}"] .why').inner_text()
            assert await page.locator(f'.card[data-id="{ids["pending"]}"] .spinner').count() == 1
            await page.locator(f'.card[data-id="{ids["hero"]}"] .path code').wait_for()
            await page.screenshot(path=str(ARTIFACTS / "gallery.png"), full_page=True)

            order = [ids[k] for k in ("pending", "failed", "hero", "whale", "fox")]
            await page.fill("#q", "whale")
            await page.wait_for_function(SHOWN, arg=[ids["whale"]], timeout=10_000)
            await page.fill("#q", "")
            await page.select_option("#status", "failed")
            await page.wait_for_function(SHOWN, arg=[ids["failed"]], timeout=10_000)
            await page.select_option("#status", "")
            await page.select_option("#provider", "placeholder")
            await page.wait_for_function(SHOWN, arg=[ids["whale"], ids["fox"]], timeout=10_000)
            await page.select_option("#provider", "")
            await page.wait_for_function(SHOWN, arg=order, timeout=10_000)

            await page.locator(f'.card[data-id="{ids["whale"]}"]').click()
            await page.wait_for_function("() => { const i = document.querySelector('dialog[open] #full');"
                                         " return i && i.complete && i.naturalWidth > 0; }", timeout=10_000)
            detail = page.locator("dialog[open]")
            assert "a blue whale, watercolour" in await detail.locator("h2").inner_text()
            provenance = await detail.locator("table.kv").last.inner_text()
            assert "prediction_id" in provenance and ids["whale"] in provenance
            assert await detail.locator(".strip img").count() == 2
            await page.wait_for_function("() => [...document.querySelectorAll('dialog[open] .strip img')]"
                                         ".every((i) => i.complete && i.naturalWidth > 0)", timeout=10_000)
            await page.screenshot(path=str(ARTIFACTS / "gallery-detail.png"))
            await page.keyboard.press("Escape")

            # The job goes on: the server checks on it (here, another process than the gallery's), and the
            # page, polling, shows the finished image without being reloaded.
            fake.hold = False
            fake.finish(ids["job"])
            async with connect(settings, fake) as client:
                checked = await client.call_tool("check_prediction", {"prediction_id": ids["pending"]})
            assert checked.structured_content["status"] == "succeeded"
            finished = page.locator(f'.card[data-id="{ids["pending"]}"][data-status="succeeded"] .thumb img')
            await finished.wait_for(timeout=15_000)
            await page.wait_for_function(EVERY_THUMBNAIL_RENDERED, timeout=10_000)
            assert await page.locator(".card .thumb img").count() == 4
            await page.screenshot(path=str(ARTIFACTS / "gallery-finished.png"), full_page=True)
        finally:
            await browser.close()
    assert errors == []


# --- the MCP App, in a real browser inside a minimal host -----------------------------------------------------

HOST_PAGE = """<!doctype html><html><body style="margin:0;background:#111">
<iframe id="app" sandbox="allow-scripts" style="border:0;width:860px;height:640px"></iframe>
<script>
const frame = document.getElementById("app");
const post = (msg) => frame.contentWindow.postMessage({ jsonrpc: "2.0", ...msg }, "*");
window.hostLog = [];
window.deliver = (result) => post({ method: "ui/notifications/tool-result", params: result });
window.addEventListener("message", async (event) => {
  if (event.source !== frame.contentWindow) return;
  const m = event.data;
  window.hostLog.push(m.method || "response");
  if (m.method === "ui/initialize") {
    post({ id: m.id, result: { protocolVersion: "2026-01-26", hostInfo: { name: "test-host", version: "1" },
      hostCapabilities: { serverResources: {}, serverTools: {} },
      hostContext: { theme: "dark", styles: { variables: { "--color-background-primary": "#101216" } } } } });
  } else if (m.method === "ui/notifications/initialized") {
    window.appReady = true;
  } else if (m.method === "resources/read" || m.method === "tools/call") {
    try { post({ id: m.id, result: await window.mcp(m.method, m.params) }); }
    catch (err) { post({ id: m.id, error: { code: -32000, message: String(err) } }); }
  }
});
</script></body></html>"""


@pytest.mark.browser
async def test_the_mcp_app_shows_a_result_and_the_recent_gallery(settings, fake, chromium: str):
    from playwright.async_api import async_playwright

    await make_journal(settings, fake)
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    async with connect(settings, fake) as client, async_playwright() as pw:
        app_html = (await client.read_resource("ui://flux-mcp/app")).contents[0].text
        fake.hold = True
        pending = await client.call_tool("generate_image", {"prompt": "a kite over dunes", "wait_seconds": 0})
        calls: list[str] = []

        async def mcp(method: str, params: dict[str, Any]) -> dict[str, Any]:
            calls.append(method if method != "tools/call" else params["name"])
            if method == "resources/read":
                answer: Any = await client.read_resource(params["uri"])
            else:
                answer = await client.call_tool(params["name"], params.get("arguments") or {})
            return answer.model_dump(mode="json", by_alias=True, exclude_none=True)

        browser = await pw.chromium.launch(executable_path=chromium, args=LAUNCH_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 860, "height": 640})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.expose_function("mcp", mcp)
            await page.set_content(HOST_PAGE)
            await page.evaluate("(html) => { document.getElementById('app').srcdoc = html; }", app_html)
            await page.wait_for_function("() => window.appReady === true", timeout=10_000)
            app = page.frames[1]
            # The recent gallery: every finished job's thumbnail, read through the host as resources.
            await app.wait_for_function("() => { const i = [...document.querySelectorAll('.recent img')];"
                                        " return i.length === 3 && i.every((x) => x.complete && x.naturalWidth > 0); }",
                                        timeout=10_000)
            # A pending result: shown as pending, then (the app checking on it) finished, without a new job.
            await page.evaluate("(r) => window.deliver(r)", pending.model_dump(mode="json", by_alias=True,
                                                                               exclude_none=True))
            await app.locator(".result .s-starting, .result .s-processing").wait_for(timeout=5_000)
            fake.hold = False
            fake.finish(next(iter(reversed(fake.jobs))))  # the kite
            await app.wait_for_function("() => { const i = document.querySelector('.result .images img');"
                                        " return i && i.complete && i.naturalWidth > 0; }", timeout=15_000)
            assert await app.locator(".result .s-succeeded").count() == 1
            assert "check_prediction" in calls and "generate_image" not in calls
            await app.wait_for_function("() => [...document.querySelectorAll('.recent img')].length === 4", timeout=10_000)
            await page.screenshot(path=str(ARTIFACTS / "mcp-app.png"))
            await app.locator(".recent button").first.click()
            await app.wait_for_function("() => { const i = document.querySelector('.view.on img');"
                                        " return i && i.complete && i.naturalWidth > 0; }", timeout=10_000)
            await page.screenshot(path=str(ARTIFACTS / "mcp-app-image.png"))
        finally:
            await browser.close()
    assert errors == []
    assert len(fake.ledger) == 4  # hero, failed, pending and the kite: the app never submitted a job


@pytest.mark.subprocess
def test_gallery_command_opens_the_browser_unless_told_not_to(home: Path, tmp_path: Path):
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "flux_mcp", "gallery"], env=child_env(home, BROWSER=f"{browser} %s"),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        printed = proc.stdout.readline()
        address = re.search(r"http://127\.0\.0\.1:(\d+)/", printed)
        assert address, printed
        # Answered only once the browser command returned (it runs before the server starts serving).
        assert httpx2.get(address.group(0), timeout=30).status_code == 200
        busy = subprocess.run([sys.executable, "-m", "flux_mcp", "gallery", "--no-open", "--port", address.group(1)],
                              env=child_env(home), capture_output=True, text=True, timeout=60, check=False)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
    assert opened.read_text().strip() == address.group(0)  # webbrowser ran the user's $BROWSER on it
    assert busy.returncode == 2 and "pick another --port" in busy.stderr
