"""History for the model and the person: the journal's search, list_predictions, flux://history, the
MCP App's resources, and `flux-mcp history`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import anyio
import pytest

from flux_mcp import history
from flux_mcp.errors import InvalidInput
from flux_mcp.journal import SCHEMA_VERSION, Record, open_journal
from flux_mcp.models import ImageOutput
from tests.conftest import ATLAS_KEY, connect, text_of
from tests.fakes.atlascloud import AtlasFake
from tests.subprocess_helpers import child_env

pytestmark = pytest.mark.anyio
NOW = 1_750_000_000.0


def rec(n: int, prompt: str, *, status: str = "succeeded", provider: str = "atlascloud", principal: str = "local",
        at: float | None = None, cost: float | None = None) -> Record:
    return Record(id=f"{provider}:job{n:03d}", provider=provider, native_id=f"job{n:03d}", model="m", kind="generate",
                  status=status, request={"prompt": prompt, "width": 64, "height": 64}, principal=principal,  # type: ignore[arg-type]
                  created_at=NOW + n if at is None else at, cost_usd=cost,
                  images=[ImageOutput(path=f"/tmp/x/{n}.png", mime_type="image/png")] if status == "succeeded" else [])


async def search(journal, **kw):
    args = {"principal": None, "query": None, "provider": None, "status": None, "since": None, "limit": 50,
            "before": None, **kw}
    return [r.id for r in await journal.search(**args)]


@pytest.fixture
async def journal(home: Path):
    journal = open_journal(home)
    yield journal
    await journal.close()


# --- the journal's search --------------------------------------------------------------------------------

async def test_search_matches_every_word_of_the_query_in_any_case_and_order(journal):
    for n, prompt in enumerate(["A hero image for the Landing page", "hero", "Straße bei Nacht", "landing strip"]):
        await journal.put(rec(n, prompt))
    assert await search(journal, query="landing HERO") == ["atlascloud:job000"]
    assert await search(journal, query="hero") == ["atlascloud:job001", "atlascloud:job000"]
    assert await search(journal, query="STRASSE") == ["atlascloud:job002"]  # Unicode case folding
    assert await search(journal, query="her%") == []  # no wildcard: the text as typed
    assert await search(journal, query="   ") == await search(journal)


async def test_search_filters_by_provider_status_and_since(journal):
    await journal.put(rec(1, "one", provider="segmind"))
    await journal.put(rec(2, "two", status="failed"))
    await journal.put(rec(3, "three", status="processing"))
    await journal.put(rec(4, "four", status="starting", at=NOW - 86_400))
    assert await search(journal, provider="segmind") == ["segmind:job001"]
    assert await search(journal, status="failed") == ["atlascloud:job002"]
    assert await search(journal, status="pending") == ["atlascloud:job003", "atlascloud:job004"]
    assert await search(journal, since=NOW) == ["atlascloud:job003", "atlascloud:job002", "segmind:job001"]


async def test_search_pages_newest_first_without_gaps_or_repeats_even_at_equal_times(journal):
    for n in range(23):
        await journal.put(rec(n, f"prompt {n}", at=NOW + n // 4))  # four jobs share each second
    seen: list[str] = []
    cursor = None
    while True:
        page = await history.page(journal, principal=None, limit=5, before=cursor)
        seen += [r.id for r in page.records]
        if page.next is None:
            break
        cursor = page.next
    everything = await search(journal)
    assert seen == everything and len(set(seen)) == 23
    created = [r.created_at for r in await journal.search(principal=None, query=None, provider=None, status=None,
                                                          since=None, limit=50, before=None)]
    assert created == sorted(created, reverse=True)


async def test_search_shows_each_principal_only_their_own_jobs(journal):
    await journal.put(rec(1, "mine"))
    await journal.put(rec(2, "alice's", principal="alice"))
    assert await search(journal, principal="local") == ["atlascloud:job001"]
    assert await search(journal, principal="alice") == ["atlascloud:job002"]
    assert await search(journal, principal="bob") == []
    assert await search(journal) == ["atlascloud:job002", "atlascloud:job001"]  # the terminal's view


async def test_search_finds_a_job_whose_write_has_not_landed_yet(journal, home: Path):
    await journal.put(rec(1, "on disk"))
    other = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the next write is kept in memory
    try:
        assert await journal.put(rec(2, "in memory")) is False
        assert await journal.put(rec(1, "on disk, now failed", status="failed")) is False
        with anyio.fail_after(5):  # a read never waits for the writer (WAL)
            assert await search(journal) == ["atlascloud:job002", "atlascloud:job001"]
            assert await search(journal, status="succeeded") == ["atlascloud:job002"]  # job 1 failed since
            assert await search(journal, query="memory") == ["atlascloud:job002"]
    finally:
        other.execute("ROLLBACK")
        other.close()


async def test_a_schema_2_journal_is_migrated_with_the_history_indexes(home: Path):
    home.mkdir(parents=True)
    db = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    from flux_mcp.journal import _MIGRATIONS

    for step in (1, 2):
        for statement in filter(str.strip, _MIGRATIONS[step].split(";")):
            db.execute(statement)
    db.execute("PRAGMA user_version=2")
    db.execute("INSERT INTO predictions (id, provider, native_id, model, kind, status, request, created_at, "
               "updated_at) VALUES ('atlascloud:old', 'atlascloud', 'old', 'm', 'generate', 'succeeded', "
               "'{\"prompt\": \"an old hero\"}', 1, 1)")
    db.close()
    journal = open_journal(home)
    try:
        assert await search(journal, query="hero") == ["atlascloud:old"]
    finally:
        await journal.close()
    db = sqlite3.connect(home / "journal.sqlite3")
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {row[1] for row in db.execute("PRAGMA index_list(predictions)")}
    plan = " ".join(str(r) for r in db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM predictions WHERE principal='local' ORDER BY created_at DESC, id DESC"))
    db.close()
    assert {"predictions_history", "predictions_created"} <= indexes
    assert "predictions_history" in plan and "TEMP B-TREE" not in plan  # a page is read in index order


# --- since ---------------------------------------------------------------------------------------------

def test_since_reads_spans_days_and_dates():
    midnight = datetime.fromtimestamp(NOW).replace(hour=0, minute=0, second=0, microsecond=0)
    assert history.parse_since("2d", NOW) == NOW - 2 * 86_400
    assert history.parse_since("3 hours ago", NOW) == NOW - 3 * 3600
    assert history.parse_since("90m", NOW) == NOW - 90 * 60
    assert history.parse_since("1w", NOW) == NOW - 7 * 86_400
    assert history.parse_since("today", NOW) == midnight.timestamp()
    assert history.parse_since("Yesterday", NOW) == (midnight - timedelta(days=1)).timestamp()
    assert history.parse_since("2025-06-01", NOW) == datetime(2025, 6, 1).timestamp()
    assert history.parse_since("2025-06-01T14:30", NOW) == datetime(2025, 6, 1, 14, 30).timestamp()
    assert history.parse_since("2025-06-01T12:00:00Z", NOW) == datetime.fromisoformat("2025-06-01T12:00+00:00").timestamp()
    for bad in ("soon", "2 fortnights", "2025-13-01", ""):
        with pytest.raises(InvalidInput, match="not a date or a span"):
            history.parse_since(bad, NOW)


def test_a_cursor_that_was_not_issued_is_refused():
    with pytest.raises(InvalidInput, match="not a cursor"):
        history.decode_cursor("not-a-cursor")


# --- list_predictions and flux://history through the SDK client -------------------------------------------

async def make_jobs(settings, fake: AtlasFake) -> dict[str, str]:
    """A finished hero image, a second image, a failed job and a pending one, through the real tools."""
    async with connect(settings, fake) as client:
        ids = {}
        for name, prompt in (("hero", "A hero image, sunset over hills"), ("logo", "a flat fox logo")):
            ids[name] = (await client.call_tool("generate_image", {"prompt": prompt})).structured_content["prediction_id"]
        fake.outcome = "fail"
        ids["failed"] = (await client.call_tool("generate_image", {"prompt": "a cursed hero"})).structured_content[
            "prediction_id"]
        fake.outcome, fake.hold = "ok", True
        ids["pending"] = (await client.call_tool("generate_image", {"prompt": "a pending hero", "wait_seconds": 0})
                          ).structured_content["prediction_id"]
    return ids


async def test_list_predictions_finds_earlier_work_by_prompt_and_status(settings, fake):
    ids = await make_jobs(settings, fake)
    async with connect(settings, fake) as client:
        heroes = await client.call_tool("list_predictions", {"query": "HERO"})
        failed = await client.call_tool("list_predictions", {"status": "failed"})
        pending = await client.call_tool("list_predictions", {"status": "pending"})
        one = await client.call_tool("list_predictions", {"limit": 1})
        everything = await client.call_tool("list_predictions", {})
    rows = heroes.structured_content["predictions"]
    assert [r["id"] for r in rows] == [ids["pending"], ids["failed"], ids["hero"]]
    hero = rows[-1]
    assert hero["status"] == "succeeded" and Path(hero["path"]).is_file() and hero["prompt"].startswith("A hero")
    assert hero["cost_usd"] == pytest.approx(0.003)
    assert datetime.fromisoformat(hero["when"]).timestamp() == pytest.approx(time.time(), abs=120)
    assert ids["hero"] in text_of(heroes) and hero["path"] in text_of(heroes)
    assert [r["id"] for r in failed.structured_content["predictions"]] == [ids["failed"]]
    assert failed.structured_content["predictions"][0]["error"]
    assert [r["id"] for r in pending.structured_content["predictions"]] == [ids["pending"]]
    assert "path" not in pending.structured_content["predictions"][0]
    assert one.structured_content["more"] is True and len(one.structured_content["predictions"]) == 1
    assert "raise limit" in text_of(one)
    assert everything.structured_content["more"] is False and len(everything.structured_content["predictions"]) == 4


async def test_list_predictions_since_keeps_only_recent_jobs(settings, fake, home: Path):
    ids = await make_jobs(settings, fake)
    db = sqlite3.connect(home / "journal.sqlite3", isolation_level=None)
    db.execute("UPDATE predictions SET created_at=? WHERE id=?", (time.time() - 3 * 86_400, ids["logo"]))
    db.close()
    async with connect(settings, fake) as client:
        recent = await client.call_tool("list_predictions", {"since": "2d"})
        bad = await client.call_tool("list_predictions", {"since": "last tuesday-ish"})
        unknown = await client.call_tool("list_predictions", {"status": "lost"})
    assert ids["logo"] not in [r["id"] for r in recent.structured_content["predictions"]]
    assert len(recent.structured_content["predictions"]) == 3
    assert bad.is_error and "2d" in text_of(bad) and "yesterday" in text_of(bad)
    assert unknown.is_error


async def test_list_predictions_never_shows_another_principals_jobs(settings, fake, home: Path):
    await make_jobs(settings, fake)
    journal = open_journal(home)
    await journal.put(rec(1, "alice's secret hero", principal="alice", at=time.time()))
    await journal.close()
    async with connect(settings, fake) as client:
        listed = await client.call_tool("list_predictions", {"query": "hero"})
        page = json.loads((await client.read_resource("flux://history?query=secret")).contents[0].text)
    assert "alice" not in json.dumps(listed.structured_content) and "secret" not in text_of(listed)
    assert page["predictions"] == []


async def test_flux_history_pages_through_every_job_once(settings, fake):
    ids = await make_jobs(settings, fake)
    seen: list[str] = []
    async with connect(settings, fake) as client:
        uri: str | None = "flux://history?limit=1"
        while uri:
            page = json.loads((await client.read_resource(uri)).contents[0].text)
            seen += [r["id"] for r in page["predictions"]]
            uri = page["next"]
        heroes = json.loads((await client.read_resource("flux://history?query=hero&status=succeeded")).contents[0].text)
    assert seen == [ids["pending"], ids["failed"], ids["logo"], ids["hero"]]
    assert [r["id"] for r in heroes["predictions"]] == [ids["hero"]] and heroes["next"] is None


async def test_the_mcp_app_is_offered_without_changing_the_ordinary_result(settings, fake):
    async with connect(settings, fake) as client:
        caps = client.server_capabilities
        tools = {t.name: t for t in (await client.list_tools()).tools}
        app = (await client.read_resource("ui://flux-mcp/app")).contents[0]
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse"})
        pid = result.structured_content["prediction_id"]
        thumb = (await client.read_resource(f"flux://thumbnails/{pid}/0")).contents[0]
    uri = "ui://flux-mcp/app"
    for name in ("generate_image", "edit_image", "list_predictions"):
        assert tools[name].meta == {"ui": {"resourceUri": uri}}
    assert not (tools["upload_media"].meta or {}).get("ui") and not (tools["check_prediction"].meta or {}).get("ui")
    assert app.mime_type == "text/html;profile=mcp-app" and "ui/initialize" in app.text
    assert "http://" not in app.text and "https://" not in app.text  # no external asset: works offline
    assert caps.extensions is not None and "io.modelcontextprotocol/ui" in caps.extensions
    assert [b.type for b in result.content] == ["text", "image"]  # the text and the preview, as for every client
    assert thumb.mime_type == "image/webp"


# --- flux-mcp history ------------------------------------------------------------------------------------

def run_history(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flux_mcp", "history", *args], check=False, env=child_env(home),
                          capture_output=True, text=True, timeout=60)


@pytest.mark.subprocess
async def test_history_command_prints_the_journal_newest_first(settings, fake, home: Path):
    ids = await make_jobs(settings, fake)
    table = run_history(home)
    as_json = run_history(home, "--json", "--status", "succeeded")
    heroes = run_history(home, "hero", "--since", "1d", "--provider", "atlascloud")
    bad = run_history(home, "--since", "whenever")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["when", "status", "provider", "cost", "prompt", "path"]
    statuses = [line.split()[2] for line in lines[1:]]
    assert statuses[0] in ("starting", "processing") and statuses[1:] == ["failed", "succeeded", "succeeded"]
    assert "$0.0030" in lines[-1] and "A hero image" in lines[-1]
    rows = json.loads(as_json.stdout)["predictions"]
    assert [r["id"] for r in rows] == [ids["logo"], ids["hero"]]
    assert all(Path(r["images"][0]["path"]).is_file() for r in rows)
    assert len(heroes.stdout.splitlines()) == 4  # header + three jobs with "hero" in the prompt
    assert bad.returncode == 2 and "not a date or a span" in bad.stderr
    assert ATLAS_KEY not in table.stdout + as_json.stdout + heroes.stdout
