"""A data folder the server cannot write (a read-only mount, a folder of another user) with a valid journal:
the real `flux-mcp` over stdio still answers `check_prediction` for finished jobs from that journal, says in
one line that the folder is read-only, and refuses new jobs naming FLUX_MCP_HOME before anything is sent.

How the folder is made read-only: for an ordinary user, by taking the write bits away (the journal is then
opened `mode=ro`/`immutable`, as SQLite cannot create its WAL index there). As root, permission bits do not
stop writes, so the child runs in a mount namespace of its own (`unshare -m`) in which the folder is bound
read-only over itself: every write there fails with EROFS, exactly as on a read-only volume.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from tests.conftest import ATLAS_KEY, connect, text_of
from tests.subprocess_helpers import child_env

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess, pytest.mark.local_disk]
_BIND_READ_ONLY = 'mount --bind "$RO_DIR" "$RO_DIR" && mount -o remount,ro,bind "$RO_DIR" && exec "$@"'


def _unshare_works(folder: Path) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", _BIND_READ_ONLY, "sh", "sh", "-c", f": > '{folder}/probe'"],
                           env={**os.environ, "RO_DIR": str(folder)}, capture_output=True, timeout=30, check=False)
    return probe.returncode != 0 and b"Read-only file system" in probe.stderr


@pytest.fixture
def read_only(home: Path) -> Iterator[tuple[str, list[str], dict[str, str]]]:
    """(how, the command that starts the server with `home` read-only, extra environment)."""
    if os.geteuid() != 0:
        for path in [home, *home.rglob("*")]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        try:
            yield "write bits removed", [sys.executable, "-m", "flux_mcp"], {}
        finally:
            for path in [home, *home.rglob("*")]:
                path.chmod(path.stat().st_mode | stat.S_IWUSR)
        return
    try:
        usable = _unshare_works(home)
    except (OSError, subprocess.SubprocessError):
        usable = False
    if not usable:
        pytest.skip("running as root without a mount namespace (unshare -m): cannot make the folder read-only")
    yield ("read-only bind mount", ["unshare", "-m", "sh", "-c", _BIND_READ_ONLY, "sh", sys.executable, "-m",
                                    "flux_mcp"], {"RO_DIR": str(home)})


@pytest.fixture
async def finished(settings, loopback_fake) -> dict:
    """A finished job (its image in the data folder), made by a server that could write there."""
    async with connect(settings, loopback_fake) as client:
        result = await client.call_tool("generate_image", {"prompt": "a lighthouse at dusk"})
    assert result.structured_content["status"] == "succeeded", text_of(result)
    return result.structured_content


async def test_a_read_only_data_folder_still_answers_for_finished_jobs_and_refuses_new_ones(
        finished, read_only, home: Path, workspace: Path, loopback_fake):
    how, command, extra = read_only
    before = (home / "journal.sqlite3").read_bytes()
    paid = len(loopback_fake.ledger)
    env = child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=loopback_fake.url, **extra)
    errlog = workspace / ".stderr.log"
    with errlog.open("w") as err:
        params = StdioServerParameters(command=command[0], args=command[1:], env=env, cwd=str(workspace))
        async with Client(stdio_client(params, errlog=err)) as client:
            checked = await client.call_tool("check_prediction", {"prediction_id": finished["prediction_id"]})
            new = await client.call_tool("generate_image", {"prompt": "another lighthouse"})
    sc = checked.structured_content
    assert not checked.is_error, f"{how}: {text_of(checked)}"
    assert sc["status"] == "succeeded" and sc["images"][0]["path"] == finished["images"][0]["path"]
    assert Path(sc["images"][0]["path"]).is_file()
    notes = [line for line in text_of(checked).splitlines() if "read-only" in line]
    assert notes and str(home) in notes[0] and "FLUX_MCP_HOME" in notes[0]
    assert new.is_error and "read-only" in text_of(new) and "FLUX_MCP_HOME" in text_of(new)
    assert len(loopback_fake.ledger) == paid and not [r for r in loopback_fake.requests if r.startswith("POST")
                                                      and "generateImage" in r][paid:]
    said = [line for line in errlog.read_text().splitlines() if "read-only" in line]
    assert len(said) == 1 and str(home) in said[0], errlog.read_text()
    assert "Traceback" not in errlog.read_text()
    assert (home / "journal.sqlite3").read_bytes() == before


@pytest.fixture
def empty_home(home: Path) -> Path:
    home.mkdir(parents=True)
    return home


def test_a_read_only_data_folder_without_a_journal_is_one_clear_line_at_start(empty_home, read_only,
                                                                               workspace: Path):
    how, command, extra = read_only
    done = subprocess.run(command, env=child_env(empty_home, **extra), cwd=workspace, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, (how, done.stderr)
    [line] = done.stderr.strip().splitlines()
    assert str(empty_home) in line and "read-only" in line and "FLUX_MCP_HOME" in line, line
    assert list(empty_home.iterdir()) == []
