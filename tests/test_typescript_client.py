"""The TypeScript SDK 1.x client (npm `@modelcontextprotocol/sdk@1`), with its default options, against
the real `flux-mcp` command over stdio: a job that outlasts the SDK's 60-second request timeout still
gets an answer (pending, then finished through check_prediction), never `-32001 Request timed out`.

The SDK times a request out after 60 s whatever progress arrives, unless the caller opts into
`resetTimeoutOnProgress`; the server answers pending before its wait cap (FLUX_MCP_MAX_WAIT_SECONDS,
50 s by default). The cap is lowered here to keep the test short; the default is asserted to be
below the SDK's own timeout, read from the installed SDK.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flux_mcp.config import Settings
from tests.conftest import ATLAS_KEY
from tests.npm_tools import TS_SDK, NpmTools, npm_tools  # noqa: F401 - the session fixture
from tests.subprocess_helpers import child_env

pytestmark = pytest.mark.subprocess
SCRIPT = Path(__file__).parent / "node" / "ts_sdk_call.cjs"
CAP = "3"
"""FLUX_MCP_MAX_WAIT_SECONDS in this test: any value under the SDK's timeout proves the point."""


@pytest.fixture
def fake(loopback_fake):
    loopback_fake.hold = True  # the job runs until the test finishes it: far longer than 60 s
    return loopback_fake


def flux_mcp_command() -> str:
    found = shutil.which("flux-mcp", path=str(Path(sys.executable).parent))
    assert found, "the flux-mcp command is not installed beside this Python (pip install -e .)"
    return found


def ts_call(tools: NpmTools, env: dict[str, str], cwd: Path, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [str(tools.node), str(SCRIPT), str(tools.node_modules.parent), tool, json.dumps(arguments),
         flux_mcp_command()],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ATLAS_KEY not in proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_job_longer_than_the_sdks_timeout_is_answered_pending_then_finished(npm_tools, fake, home, workspace):  # noqa: F811
    env = {**npm_tools.env(home.parent / "node-home"),
           **child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url,
                       FLUX_MCP_MAX_WAIT_SECONDS=CAP)}
    first = ts_call(npm_tools, env, workspace, "generate_image", {"prompt": "a lighthouse", "wait_seconds": 600})
    assert first["sdk"] == TS_SDK
    timeout_s = first["defaultTimeoutMs"] / 1000
    assert Settings.from_env({"FLUX_MCP_HOME": str(home)}, cwd=workspace).max_wait_seconds < timeout_s == 60
    assert "error" not in first, first["error"]  # not -32001: the answer came before the SDK gave up
    result = first["result"]
    assert not result.get("isError"), result
    pending = result["structuredContent"]  # validated by the SDK against the advertised outputSchema
    assert pending["status"] in ("starting", "processing")
    assert "check_prediction" in pending["message"] and first["elapsedMs"] < first["defaultTimeoutMs"]
    [job_id] = fake.jobs
    assert pending["prediction_id"] == f"atlascloud:{job_id}" and len(fake.ledger) == 1

    fake.finish(job_id)
    second = ts_call(npm_tools, env, workspace, "check_prediction",
                     {"prediction_id": pending["prediction_id"], "wait_seconds": 600})
    assert "error" not in second, second["error"]
    done = second["result"]["structuredContent"]
    assert done["status"] == "succeeded" and Path(done["images"][0]["path"]).is_file()
    assert len(fake.ledger) == 1  # the pending answer never made anyone submit again
