"""Retention: `flux-mcp prune` and FLUX_MCP_KEEP_DAYS remove old finished jobs and their stored images,
never a pending job's and never a save_to copy."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flux_mcp.journal import open_journal
from flux_mcp.prune import prune
from flux_mcp.store import FolderStore
from tests.conftest import ATLAS_KEY, connect
from tests.fakes.atlascloud import AtlasFake

pytestmark = pytest.mark.anyio
DAY = 86_400


async def make_history(settings, workspace: Path) -> dict[str, dict]:
    """Three jobs: an old one with a save_to copy, an old pending one, a recent one."""
    fake = AtlasFake(key=ATLAS_KEY)
    async with connect(settings, fake) as client:
        old = await client.call_tool("generate_image", {"prompt": "old", "save_to": "public/old.png"})
        recent = await client.call_tool("generate_image", {"prompt": "recent"})
        fake.hold = True
        pending = await client.call_tool("generate_image", {"prompt": "pending", "wait_seconds": 0})
    jobs = {"old": old.structured_content, "recent": recent.structured_content, "pending": pending.structured_content}
    db = sqlite3.connect(settings.home / "journal.sqlite3", isolation_level=None)
    for name in ("old", "pending"):
        db.execute("UPDATE predictions SET updated_at=?, created_at=? WHERE id=?",
                   (time.time() - 40 * DAY, time.time() - 40 * DAY, jobs[name]["prediction_id"]))
    db.close()
    return jobs


async def test_prune_removes_old_finished_jobs_and_their_stored_images_only(settings, workspace: Path, home: Path):
    jobs = await make_history(settings, workspace)
    stored_old = next((home / "images").rglob("*")).parent  # the provider's folder
    assert stored_old.is_dir()
    journal = open_journal(home)
    try:
        preview = await prune(journal, FolderStore(home), older_than_days=30, dry_run=True)
        assert preview.predictions == [jobs["old"]["prediction_id"]]
        assert await journal.get(jobs["old"]["prediction_id"]) is not None  # a dry run removes nothing
        done = await prune(journal, FolderStore(home), older_than_days=30)
        assert done.predictions == [jobs["old"]["prediction_id"]] and done.files
        assert all(Path(f).is_relative_to(home / "images") and not Path(f).exists() for f in done.files)
        assert await journal.get(jobs["old"]["prediction_id"]) is None
        assert await journal.get(jobs["pending"]["prediction_id"]) is not None
        assert await journal.get(jobs["recent"]["prediction_id"]) is not None
    finally:
        await journal.close()
    assert (workspace / "public" / "old.png").is_file()  # the project's copy is the project's
    assert Path(jobs["recent"]["images"][0]["path"]).is_file()


@pytest.mark.subprocess
async def test_the_prune_command_lists_in_a_dry_run_and_keep_days_prunes_at_start(settings, workspace: Path,
                                                                                   home: Path):
    jobs = await make_history(settings, workspace)
    env = {"FLUX_MCP_HOME": str(home), "PATH": "", "HOME": str(workspace)}
    cmd = [sys.executable, "-m", "flux_mcp"]
    dry = subprocess.run([*cmd, "prune", "--older-than", "30", "--dry-run"], env=env, cwd=workspace,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "would remove 1 prediction(s)" in dry.stderr
    assert dry.stdout.strip() and all(Path(line).exists() for line in dry.stdout.split())
    # FLUX_MCP_KEEP_DAYS prunes when the server starts (stdio: stdin closed at once, the server exits).
    served = subprocess.run(cmd, env={**env, "FLUX_MCP_KEEP_DAYS": "30"}, cwd=workspace, input="",
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 0, served.stderr
    assert served.stdout == ""  # stdout stays the JSON-RPC channel
    journal = open_journal(home)
    try:
        assert await journal.get(jobs["old"]["prediction_id"]) is None
        assert await journal.get(jobs["pending"]["prediction_id"]) is not None
    finally:
        await journal.close()


async def test_prune_drops_failover_attempts_older_than_a_day_whatever_the_cut_off(home: Path):
    from flux_mcp.journal import Attempt

    journal = open_journal(home)
    try:
        now = time.time()
        for hours in (2, 30):  # written oldest last: a write trims rows a day older than itself
            await journal.add_attempt(Attempt("local", "atlascloud", "m", "no_credit", f"{hours} h ago",
                                              at=now - hours * 3600))
        done = await prune(journal, FolderStore(home), older_than_days=30)
        assert done.attempts == 1 and done.predictions == []
        assert (await journal.refusals_since(0))["atlascloud"].last_reason == "2 h ago"
        assert (await prune(journal, FolderStore(home), older_than_days=0.01, dry_run=True)).attempts == 1
        assert (await prune(journal, FolderStore(home), older_than_days=0.01)).attempts == 1
        assert await journal.refusals_since(0) == {}
    finally:
        await journal.close()
