"""The real command over stdio, SSE and streamable HTTP, against the Atlas Cloud fake on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.sse import sse_client

from tests.conftest import ATLAS_KEY, text_of
from tests.fakes.wire import png_bytes
from tests.subprocess_helpers import child_env, flux_command, http_server

pytestmark = [pytest.mark.anyio, pytest.mark.subprocess]
TOOLS = {"generate_image", "edit_image", "upload_media", "check_prediction", "list_predictions"}


@pytest.fixture
def fake(loopback_fake):
    return loopback_fake


@pytest.fixture
def env(fake, home):
    return child_env(home, ATLASCLOUD_API_KEY=ATLAS_KEY, ATLASCLOUD_BASE_URL=fake.url)


def stdio(env: dict[str, str], cwd: Path) -> StdioServerParameters:
    return StdioServerParameters(command=sys.executable, args=["-m", "flux_mcp"], env=env, cwd=str(cwd))


async def test_stdio_client_gets_images_edits_uploads_and_checks(env, fake, workspace):
    (workspace / "logo.png").write_bytes(png_bytes(20, 20))
    async with Client(stdio(env, workspace)) as client:
        tools = (await client.list_tools()).tools
        assert {t.name for t in tools} == TOOLS
        assert all(t.output_schema for t in tools)
        generated = await client.call_tool("generate_image", {"prompt": "a red bicycle", "save_to": "img/"})
        edited = await client.call_tool("edit_image", {"prompt": "make it blue", "image": "logo.png"})
        uploaded = await client.call_tool("upload_media", {"path": "logo.png"})
        pid = generated.structured_content["prediction_id"]
        checked = await client.call_tool("check_prediction", {"prediction_id": pid})
    assert generated.structured_content["status"] == "succeeded", text_of(generated)
    saved = Path(generated.structured_content["images"][0]["path"])
    assert saved.parent == workspace / "img" and saved.is_file()
    assert edited.structured_content["status"] == "succeeded", text_of(edited)
    assert uploaded.structured_content["url"].startswith(f"{fake.url}/uploads/")
    assert checked.structured_content == generated.structured_content
    assert len(fake.ledger) == 2


async def test_stdio_pending_job_survives_a_restart(env, fake, workspace):
    fake.hold = True
    async with Client(stdio(env, workspace)) as client:
        pending = await client.call_tool("generate_image", {"prompt": "p", "wait_seconds": 0.2})
    pid = pending.structured_content["prediction_id"]
    assert pending.structured_content["status"] in ("starting", "processing")
    fake.finish(pid.split(":", 1)[1])
    async with Client(stdio(env, workspace)) as client:
        done = await client.call_tool("check_prediction", {"prediction_id": pid, "wait_seconds": 5})
    assert done.structured_content["status"] == "succeeded"
    assert Path(done.structured_content["images"][0]["path"]).is_file()
    assert len(fake.ledger) == 1


async def test_streamable_http_serves_the_tools(env, fake, workspace):
    with http_server("streamable-http", env, workspace) as (url, _):
        async with Client(f"{url}/mcp") as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded", text_of(result)


async def test_sse_serves_the_tools(env, fake, workspace):
    with http_server("sse", env, workspace) as (url, _):
        async with Client(sse_client(f"{url}/sse"), mode="legacy") as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            result = await client.call_tool("generate_image", {"prompt": "p"})
    assert result.structured_content["status"] == "succeeded", text_of(result)


async def test_http_transport_requires_the_bearer_token_when_set(env, fake, workspace):
    token = "tok-canary-5d1e8a2c9b7f4e6a-3c0e9b7d1f"  # at least 32 characters: shorter ones are refused
    with http_server("streamable-http", {**env, "FLUX_MCP_AUTH_TOKEN": token}, workspace) as (url, _):
        async with httpx2.AsyncClient() as http:
            denied = await http.post(f"{url}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
            wrong = await http.post(f"{url}/mcp", headers={"Authorization": "Bearer nope"}, json={})
        assert denied.status_code == 401 and wrong.status_code == 401
        assert token not in denied.text
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http:
            from mcp.client.streamable_http import streamable_http_client

            async with Client(streamable_http_client(f"{url}/mcp", http_client=http)) as client:
                assert {t.name for t in (await client.list_tools()).tools} == TOOLS
    assert not any("Authorization" in h or token in str(h) for h in fake.requests)


def test_http_transport_refuses_a_public_address_without_a_token(env, workspace):
    proc = subprocess.run(flux_command("serve", "--transport", "streamable-http", "--host", "0.0.0.0"),
                          env=env, cwd=workspace, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "FLUX_MCP_AUTH_TOKEN" in proc.stderr and proc.stdout == ""


async def test_dns_rebinding_host_header_is_refused(env, fake, workspace):
    with http_server("streamable-http", env, workspace) as (url, _):
        async with httpx2.AsyncClient() as http:
            response = await http.post(f"{url}/mcp", headers={"Host": "evil.example:80",
                                                              "Accept": "application/json, text/event-stream"},
                                       json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert response.status_code in (403, 421)
